#!/usr/bin/env python3
"""Validates a Compose file against the Compose Specification's JSON schema (vendored beside this
file, compose-spec/compose-spec.json; deploy/schemas/README.md says which version).

  validate_compose.py SCHEMA COMPOSE_FILE

Exit status 0 when valid; 1 with one line per error (its path in the file and the schema's message)
or when the YAML does not parse; 2 when a file cannot be read. Like `docker compose config`, a key given twice in one mapping is an
error (PyYAML alone would keep the last one silently). Needs jsonschema and PyYAML (./dev test runs
it from a virtualenv under .local, see deploy/local/manifests.sh).
"""

import json
import sys

import jsonschema
import yaml


class StrictLoader(yaml.SafeLoader):
    """SafeLoader (with YAML merge keys, as Compose has them) that refuses duplicate keys."""


def construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)  # resolves `<<: *anchor` first, as SafeLoader does
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping_plain(node, deep=deep)


StrictLoader.construct_mapping_plain = yaml.SafeLoader.construct_mapping
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    schema_path, compose_path = argv[1], argv[2]
    try:
        with open(schema_path) as f:
            schema = json.load(f)
        with open(compose_path) as f:
            text = f.read()
    except (OSError, ValueError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    try:
        document = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        print(f"{compose_path}: {e}", file=sys.stderr)
        return 1
    # The schema names draft-07 as "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema's lookup does not know: pick the draft by name.
    if "draft-07" in schema.get("$schema", ""):
        validator_class = jsonschema.Draft7Validator
    else:
        validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    for error in errors:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        print(f"{compose_path}: {path}: {error.message}", file=sys.stderr)
    if errors:
        print(f"{compose_path}: {len(errors)} error(s) against {schema.get('title', schema_path)}", file=sys.stderr)
        return 1
    services = len((document or {}).get("services") or {})
    print(f"{compose_path}: valid against {schema.get('title', schema_path)} ({services} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
