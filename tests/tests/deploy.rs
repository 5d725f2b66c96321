//! The deploy files cannot be run here (no Docker engine); they are checked by validation.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// The documents of a multi-document YAML file of the repository.
fn yaml_documents(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
}

#[test]
fn compose_file_is_valid_and_wires_every_service() {
    let text = std::fs::read_to_string(root().join("deploy/docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    for name in ["kafka", "postgres", "command-api", "projector", "query-api"] {
        assert!(services.contains_key(name), "{name} missing");
    }
    for (svc, addr_var) in [("command-api", "COMMAND_API_ADDR"), ("projector", "PROJECTOR_ADDR"), ("query-api", "QUERY_API_ADDR")] {
        let s = &doc["services"][svc];
        assert_eq!(s["build"]["args"]["BIN"].as_str(), Some(svc));
        assert!(s["environment"][addr_var].is_string(), "{svc} has no {addr_var}");
        assert!(s["healthcheck"]["test"].is_sequence(), "{svc} has no healthcheck");
        assert!(text.contains("KAFKA_BROKERS: kafka:9092"));
    }
    for (_, s) in services {
        if let Some(b) = s.get("build") {
            let dockerfile = b["dockerfile"].as_str().unwrap();
            assert!(root().join(dockerfile).exists(), "{dockerfile} missing");
        }
    }
}

#[test]
fn kubernetes_manifests_parse_and_run_several_partition_owning_command_apis() {
    let docs = yaml_documents("deploy/k8s/taskstream.yaml");
    let writer = docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "command-api").expect("command-api deployment");
    assert!(writer["spec"]["replicas"].as_u64().unwrap_or(0) >= 2, "several command APIs share the partitions");
    assert_eq!(writer["spec"]["strategy"]["type"].as_str(), Some("RollingUpdate"));
    let env = writer["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().expect("env");
    for var in ["COMMAND_API_INSTANCE_ID", "COMMAND_API_ADVERTISED_URL"] {
        assert!(env.iter().any(|e| e["name"] == var), "peers forward to {var}");
    }
    assert!(docs.iter().any(|d| d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == "command-api"));
    for name in ["command-api", "projector", "query-api"] {
        assert!(docs.iter().any(|d| d["kind"] == "Service" && d["metadata"]["name"] == name), "{name} service missing");
    }
}

/// The local broker, the compose file and the Strimzi cluster run the same Apache Kafka release.
#[test]
fn every_deployment_runs_the_same_kafka_release() {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let lib = read("deploy/local/lib.sh");
    let version = lib.lines().find_map(|l| l.strip_prefix("KAFKA_VERSION=")).expect("KAFKA_VERSION in lib.sh").trim();
    assert!(version.starts_with("4."), "the local broker is Kafka 4.x, not {version}");
    let pom = read("deploy/local/kafka/pom.xml");
    assert!(pom.contains(&format!("<kafka.version>{version}</kafka.version>")), "pom.xml: kafka.version is not {version}");
    let compose: serde_yaml::Value = serde_yaml::from_str(&read("deploy/docker-compose.yml")).unwrap();
    assert_eq!(compose["services"]["kafka"]["image"].as_str(), Some(format!("apache/kafka:{version}").as_str()));
    let docs = yaml_documents("deploy/k8s/kafka.yaml");
    let kafka = docs.iter().find(|d| d["kind"] == "Kafka").expect("Strimzi Kafka resource");
    assert_eq!(kafka["spec"]["kafka"]["version"].as_str(), Some(version));
    let bootstrap = format!("{}-kafka-bootstrap:9092", kafka["metadata"]["name"].as_str().unwrap());
    assert!(read("deploy/k8s/taskstream.yaml").contains(&format!("KAFKA_BROKERS: {bootstrap}")), "KAFKA_BROKERS is not {bootstrap}");
}

/// No deploy file holds a usable default for the JWT secrets: compose requires them from the
/// environment (`${VAR:?...}`, no `:-default`), the Kubernetes manifest takes them from a Secret it
/// does not define, and none of the well-known defaults the services refuse appears anywhere.
#[test]
fn deploy_files_hold_no_default_secrets() {
    const SECRETS: [&str; 2] = ["AUTH_JWT_SECRET", "SERVICE_JWT_SECRET"];
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();

    let compose_text = read("deploy/docker-compose.yml");
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&compose_text).unwrap();
    compose.apply_merge().unwrap();
    let mut seen = 0;
    for (name, service) in compose["services"].as_mapping().expect("services") {
        let Some(env) = service["environment"].as_mapping() else { continue };
        for var in SECRETS {
            if let Some(value) = env.get(var) {
                seen += 1;
                let value = value.as_str().unwrap_or_default();
                assert!(
                    value.starts_with(&format!("${{{var}:?")) && value.ends_with('}'),
                    "{name:?}: {var} must be required from the environment, not {value:?}"
                );
            }
        }
    }
    assert_eq!(seen, 5, "the three services get AUTH_JWT_SECRET (the shared block), command-api and projector SERVICE_JWT_SECRET");

    let docs = yaml_documents("deploy/k8s/taskstream.yaml");
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"), "the manifest must not define the Secret (with placeholder values)");
    let mut refs = 0;
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        for container in d["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers") {
            for env in container["env"].as_sequence().into_iter().flatten() {
                if SECRETS.iter().any(|s| env["name"] == *s) {
                    refs += 1;
                    assert!(env.get("value").is_none(), "{env:?}: a secret inline");
                    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("taskstream"), "{env:?}");
                }
            }
        }
    }
    assert_eq!(refs, 4, "each service reads its secrets from the Secret");

    // No value anywhere (comments aside) is one of the defaults the services refuse.
    fn scalars(v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::String(s) => out.push(s.clone()),
            serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| scalars(i, out)),
            serde_yaml::Value::Mapping(m) => m.iter().for_each(|(k, v)| {
                scalars(k, out);
                scalars(v, out)
            }),
            serde_yaml::Value::Tagged(t) => scalars(&t.value, out),
            _ => {}
        }
    }
    let mut values = Vec::new();
    scalars(&compose, &mut values);
    docs.iter().for_each(|d| scalars(d, &mut values));
    for value in values {
        let refused = platform::secret::KNOWN_DEFAULTS.iter().any(|known| value.contains(&format!(":-{known}")) || value.trim().eq_ignore_ascii_case(known));
        assert!(!refused, "a deploy file holds the well-known secret {value:?}");
    }
}

use serde::Deserialize;
