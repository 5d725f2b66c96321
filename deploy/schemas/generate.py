#!/usr/bin/env python3
"""Regenerates the vendored JSON schemas that kubeconform checks deploy/k8s/ against (offline).

Nothing here reaches the network: it converts files you hand it (deploy/schemas/README.md says
where each one comes from, at which version, and the exact commands).

  generate.py kubernetes SRC_DIR VERSION KIND_FILE...
      SRC_DIR: the `vX.Y.Z-local-strict` folder of the kubernetes-validate wheel (PyPI), whose
      schemas come from Kubernetes' OpenAPI document and refer to one shared `_definitions.json`.
      Writes kubernetes/VERSION-standalone-strict/KIND_FILE for each KIND_FILE (e.g.
      deployment-apps-v1.json): the same schema with every definition it uses bundled into its own
      `$defs`, so each file stands alone (kubeconform's `-standalone-strict` layout).

  generate.py crds K8S_VERSION CRD_YAML...
      Converts each version of each CustomResourceDefinition the way kubeconform's
      scripts/openapi2jsonschema.py does (additionalProperties: false on every object that lists
      its properties, the root included as with DENY_ROOT_ADDITIONAL_PROPERTIES=1), plus what that
      script leaves out: `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`
      (such an object stays open) and OpenAPI's boolean exclusiveMinimum/Maximum become JSON Schema;
      `metadata` gets Kubernetes' strict ObjectMeta (from kubernetes/K8S_VERSION-standalone-strict,
      generated first), so a typo under a custom resource's metadata fails too. Descriptions are
      dropped (kubeconform does not show them; they were most of the size). Writes
      crds/<group>/<kind>_<version>.json (kubeconform's `{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json`).
"""

import copy
import json
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def write(path, schema):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, HERE)} ({os.path.getsize(path) // 1024} KiB)")


# --- Kubernetes ------------------------------------------------------------------------------

def def_name(ref):
    # "/api/_definitions.json#/$defs/X" (in a kind's file) or "#/$defs/X" (inside _definitions.json)
    marker = "#/$defs/"
    if marker not in ref:
        raise SystemExit(f"unexpected $ref {ref!r}")
    return ref.split(marker, 1)[1]


def bundle(schema, defs):
    """The schema with its $refs pointing at a `$defs` of its own holding every definition it uses."""
    used = {}

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref":
                    name = def_name(v)
                    if name not in used:
                        used[name] = None  # placeholder: breaks cycles
                        used[name] = walk(strip_descriptions(defs[name]))
                    out[k] = "#/$defs/" + name
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out = walk(strip_descriptions(schema))
    out.pop("$id", None)
    out["$schema"] = DRAFT
    out["$defs"] = dict(sorted(used.items()))
    return out


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def kubernetes(src_dir, version, kind_files):
    with open(os.path.join(src_dir, "_definitions.json")) as f:
        defs = json.load(f)["$defs"]
    out_dir = os.path.join(HERE, "kubernetes", f"{version}-standalone-strict")
    for name in kind_files:
        with open(os.path.join(src_dir, name)) as f:
            schema = json.load(f)
        if schema.get("additionalProperties") is not False:
            raise SystemExit(f"{name}: not a strict schema (expected additionalProperties: false at its root)")
        write(os.path.join(out_dir, name), bundle(schema, defs))


# --- CRDs ------------------------------------------------------------------------------------

def convert(node):
    """An OpenAPI v3 (structural CRD) schema as a strict JSON Schema (2020-12)."""
    if isinstance(node, list):
        return [convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "description" and isinstance(v, str):
            continue
        if k in ("default", "enum", "example", "x-kubernetes-validations"):
            out[k] = v  # values, not schemas
        elif k in ("properties", "patternProperties", "$defs"):
            out[k] = {name: convert(s) for name, s in v.items()}
        else:
            out[k] = convert(v)
    if out.pop("nullable", False) and "type" in out:
        t = out["type"]
        out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out and "oneOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("format") == "int-or-string":
        out.pop("format")
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for bound in ("Minimum", "Maximum"):
        flag = out.get("exclusive" + bound)
        if isinstance(flag, bool):
            limit = out.get(bound.lower())
            del out["exclusive" + bound]
            if flag and limit is not None:
                del out[bound.lower()]
                out["exclusive" + bound] = limit
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crds(k8s_version, files):
    meta_file = os.path.join(HERE, "kubernetes", f"{k8s_version}-standalone-strict", "configmap-v1.json")
    with open(meta_file) as f:
        k8s = json.load(f)
    object_meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    # ObjectMeta and what it refers to (owner references, managed fields, times), from a kind
    # that has it.
    meta_defs = {}

    def collect(name):
        if name in meta_defs:
            return
        meta_defs[name] = k8s["$defs"][name]
        for ref in refs(meta_defs[name]):
            collect(ref)

    collect(object_meta)
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for crd in docs:
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for version in spec["versions"]:
                source = version.get("schema", {}).get("openAPIV3Schema")
                if source is None:
                    continue
                schema = convert(copy.deepcopy(source))
                schema.setdefault("properties", {})["metadata"] = {"$ref": "#/$defs/" + object_meta}
                schema["additionalProperties"] = False
                schema["$schema"] = DRAFT
                schema["$defs"] = dict(sorted(meta_defs.items()))
                name = f"{kind}_{version['name']}".lower() + ".json"
                write(os.path.join(HERE, "crds", group, name), schema)


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield def_name(v)
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def main(argv):
    if len(argv) >= 4 and argv[1] == "kubernetes":
        kubernetes(argv[2], argv[3], argv[4:])
    elif len(argv) >= 3 and argv[1] == "crds":
        crds(argv[2], argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
