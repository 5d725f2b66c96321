//! The deploy files cannot be run here (no Docker engine); they are checked by validation.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
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
fn kubernetes_manifests_parse_and_keep_a_single_writer() {
    let text = std::fs::read_to_string(root().join("deploy/k8s/taskstream.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect();
    let writer = docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "command-api").expect("command-api deployment");
    assert_eq!(writer["spec"]["replicas"].as_u64(), Some(1), "the command API is the single writer");
    assert_eq!(writer["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
    for name in ["command-api", "projector", "query-api"] {
        assert!(docs.iter().any(|d| d["kind"] == "Service" && d["metadata"]["name"] == name), "{name} service missing");
    }
}

use serde::Deserialize;
