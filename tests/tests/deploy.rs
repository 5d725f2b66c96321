//! The deploy files cannot be run here (no Docker engine, no Kubernetes); they are checked by
//! validation: kubeconform and the Compose Specification's schema (deploy/local/manifests.sh, with
//! the schemas vendored in deploy/schemas), and the tests below for what a schema cannot know
//! (names that must agree with the code and with each other).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The documents of a multi-document YAML file of the repository.
fn yaml_documents(path: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path)).map(|d| Value::deserialize(d).unwrap()).collect()
}

/// Every document of every file in deploy/k8s.
fn k8s_documents() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .flat_map(|p| yaml_documents(p.strip_prefix(root()).unwrap().to_str().unwrap()))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    container(deployment)["env"].as_sequence()?.iter().find(|e| e["name"] == name)
}

/// The value a Deployment's container gets for `name`: its own env entry or the ConfigMap `taskstream`.
fn setting(docs: &[Value], deployment: &Value, name: &str) -> Option<String> {
    if let Some(e) = env(deployment, name) {
        return e["value"].as_str().map(str::to_owned);
    }
    find(docs, "ConfigMap", "taskstream")["data"][name].as_str().map(str::to_owned)
}

const SERVICES: [&str; 3] = ["command-api", "projector", "query-api"];

// --- validation ------------------------------------------------------------------------------

/// Runs deploy/local/manifests.sh check on `dir` (installs kubeconform and the compose checker the
/// first time); returns (success, stdout + stderr).
fn check_manifests(dir: &Path) -> (bool, String) {
    let out = Command::new("bash").arg(root().join("deploy/local/manifests.sh")).arg("check").arg(dir).output().expect("running deploy/local/manifests.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn manifests_and_compose_file_pass_kubeconform_and_the_compose_schema_and_a_typo_fails() {
    let (ok, out) = check_manifests(&root().join("deploy"));
    eprintln!("{out}");
    assert!(ok, "deploy/ is not valid:\n{out}");
    let count = k8s_documents().len();
    assert!(
        out.contains(&format!("{count} resources found")) && out.contains(&format!("Valid: {count}, Invalid: 0, Errors: 0, Skipped: 0")),
        "every resource validated:\n{out}"
    );
    assert!(out.contains("docker-compose.yml: valid against Compose Specification"), "{out}");

    // A copy of deploy/ with one typo at a time: each must fail, naming the misspelt field (or the
    // kind whose schema is missing).
    let typos: [(&str, &str, &str, &str); 10] = [
        ("k8s/kafka.yaml", "  partitions: 12\n", "  partitons: 12\n", "partitons"),
        ("k8s/kafka.yaml", "  authentication: { type: scram-sha-512 }", "  authentication: { type: scram-sha-256 }", "scram-sha-512"),
        ("k8s/kafka.yaml", "    authorization: { type: simple }", "    authorisation: { type: simple }", "authorisation"),
        ("k8s/postgres.yaml", "  instances: 3", "  instance: 3", "instance"),
        ("k8s/monitoring.yaml", "          expr: max", "          exp: max", "exp"),
        ("k8s/monitoring.yaml", "  endpoints:", "  endpoint:", "endpoint"),
        ("k8s/dapr.yaml", "  pubsubname:", "  pubsubName:", "pubsubName"),
        ("k8s/taskstream.yaml", "          readinessProbe:", "          readynessProbe:", "readynessProbe"),
        ("docker-compose.yml", "    healthcheck:", "    healthchek:", "healthchek"),
        // An API version without a vendored schema is an error too, never skipped.
        ("k8s/postgres.yaml", "apiVersion: postgresql.cnpg.io/v1\n", "apiVersion: postgresql.cnpg.io/v2\n", "could not find schema for Cluster"),
    ];
    let copy = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-typo-{}", std::process::id()));
    for (file, right, wrong, named) in typos {
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(copy.join("k8s")).unwrap();
        for entry in std::fs::read_dir(root().join("deploy/k8s")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, copy.join("k8s").join(path.file_name().unwrap())).unwrap();
        }
        std::fs::copy(root().join("deploy/docker-compose.yml"), copy.join("docker-compose.yml")).unwrap();
        let text = std::fs::read_to_string(copy.join(file)).unwrap();
        assert!(text.contains(right), "{file} no longer contains {right:?}: update this test");
        std::fs::write(copy.join(file), text.replacen(right, wrong, 1)).unwrap();
        let (ok, out) = check_manifests(&copy);
        assert!(!ok, "{file} with {wrong:?} passed the check:\n{out}");
        assert!(out.contains(named), "{file} with {wrong:?}: the failure does not name {named:?}:\n{out}");
        eprintln!("{file}: {right:?} -> {wrong:?} fails as it should");
    }
    let _ = std::fs::remove_dir_all(&copy);
}

// --- compose ---------------------------------------------------------------------------------

#[test]
fn compose_file_wires_every_service() {
    let text = read("deploy/docker-compose.yml");
    let doc: Value = serde_yaml::from_str(&text).unwrap();
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
    assert_eq!(doc["services"]["command-api"]["environment"]["QUERY_API_URL"].as_str(), Some("http://query-api:8081"), "GET /v1/me/export is relayed there");
    for (_, s) in services {
        if let Some(b) = s.get("build") {
            let dockerfile = b["dockerfile"].as_str().unwrap();
            assert!(root().join(dockerfile).exists(), "{dockerfile} missing");
        }
    }
}

// --- Kafka -----------------------------------------------------------------------------------

/// The local broker, the compose file and the Strimzi cluster run the same Apache Kafka release,
/// and the services name the Strimzi cluster's TLS + SCRAM listener.
#[test]
fn every_deployment_runs_the_same_kafka_release() {
    let lib = read("deploy/local/lib.sh");
    let version = lib.lines().find_map(|l| l.strip_prefix("KAFKA_VERSION=")).expect("KAFKA_VERSION in lib.sh").trim();
    assert!(version.starts_with("4."), "the local broker is Kafka 4.x, not {version}");
    let pom = read("deploy/local/kafka/pom.xml");
    assert!(pom.contains(&format!("<kafka.version>{version}</kafka.version>")), "pom.xml: kafka.version is not {version}");
    let compose: Value = serde_yaml::from_str(&read("deploy/docker-compose.yml")).unwrap();
    assert_eq!(compose["services"]["kafka"]["image"].as_str(), Some(format!("apache/kafka:{version}").as_str()));

    let docs = k8s_documents();
    let kafka = docs.iter().find(|d| d["kind"] == "Kafka").expect("Strimzi Kafka resource");
    assert_eq!(kafka["spec"]["kafka"]["version"].as_str(), Some(version));
    let listeners = kafka["spec"]["kafka"]["listeners"].as_sequence().expect("listeners");
    assert_eq!(listeners.len(), 1, "one listener, and it authenticates");
    let listener = &listeners[0];
    assert_eq!(listener["tls"].as_bool(), Some(true));
    assert_eq!(listener["authentication"]["type"].as_str(), Some("scram-sha-512"));
    assert_eq!(kafka["spec"]["kafka"]["authorization"]["type"].as_str(), Some("simple"), "ACLs enforced");
    let bootstrap = format!("{}-kafka-bootstrap:{}", kafka["metadata"]["name"].as_str().unwrap(), listener["port"].as_u64().unwrap());
    let config = find(&docs, "ConfigMap", "taskstream");
    assert_eq!(config["data"]["KAFKA_BROKERS"].as_str(), Some(bootstrap.as_str()), "KAFKA_BROKERS is not {bootstrap}");
    assert_eq!(config["data"]["KAFKA_CONFIG_SECURITY_PROTOCOL"].as_str(), Some("SASL_SSL"));
    assert_eq!(config["data"]["KAFKA_CONFIG_SASL_MECHANISM"].as_str(), Some("SCRAM-SHA-512"));

    let pool = docs.iter().find(|d| d["kind"] == "KafkaNodePool").expect("KafkaNodePool");
    assert_eq!(pool["metadata"]["labels"]["strimzi.io/cluster"], kafka["metadata"]["name"]);
    assert_eq!(pool["spec"]["replicas"].as_u64(), Some(3));
    let roles: BTreeSet<&str> = pool["spec"]["roles"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(roles, BTreeSet::from(["broker", "controller"]), "KRaft: combined nodes");
}

/// Every topic the services create when missing (platform::kafka::ensure_topics) and the
/// current-state topic have a KafkaTopic with production replication and the services' settings.
#[test]
fn every_topic_has_a_kafka_topic_with_the_right_partitions_replication_and_cleanup() {
    let docs = k8s_documents();
    let topic = |name: &str| {
        let t = find(&docs, "KafkaTopic", name);
        assert_eq!(t["metadata"]["labels"]["strimzi.io/cluster"].as_str(), Some("taskstream"), "{name}: not in the cluster");
        assert_eq!(t["spec"]["replicas"].as_u64(), Some(3), "{name}: replicas");
        assert_eq!(t["spec"]["config"]["min.insync.replicas"].as_u64(), Some(2), "{name}: min.insync.replicas");
        t
    };
    let config = |t: &Value, key: &str| match &t["spec"]["config"][key] {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => panic!("{key}: {other:?}"),
    };
    let events = topic("task-events");
    assert_eq!(events["spec"]["partitions"].as_u64(), Some(12));
    assert_eq!(config(events, "retention.ms"), "-1", "the log is never deleted by age");
    assert_eq!(config(events, "retention.bytes"), "-1", "nor by size");
    assert_eq!(config(events, "cleanup.policy"), "delete", "the log is never compacted");
    assert_eq!(topic("task-events.dlq")["spec"]["partitions"].as_u64(), Some(12));
    let owners = topic("task-events.owners");
    assert_eq!(owners["spec"]["partitions"].as_u64(), Some(1));
    assert_eq!(config(owners, "cleanup.policy"), "compact");
    let snapshots = topic("task-events.snapshots");
    assert_eq!(snapshots["spec"]["partitions"].as_u64(), Some(12), "partition p's snapshot lives in partition p");
    assert_eq!(config(snapshots, "cleanup.policy"), "compact");
    assert_eq!(config(snapshots, "max.message.bytes"), "8388608", "snapshot chunks are up to 8 MiB");
    assert_eq!(config(topic("task-updates"), "cleanup.policy"), "compact");

    // The names and sizes agree with the code's (the defaults of KafkaSettings, as the event
    // catalogue describes them).
    let code = platform::catalogue::Topics::default();
    for name in [&code.events, &code.dlq, &code.owners, &code.snapshots, &code.updates] {
        topic(name);
    }
    for name in [&code.events, &code.dlq, &code.snapshots, &code.updates] {
        assert_eq!(find(&docs, "KafkaTopic", name)["spec"]["partitions"].as_i64(), Some(i64::from(code.partitions)), "{name}: partitions");
    }
    assert!(read("platform/src/kafka.rs").contains("\"retention.ms\", \"-1\""), "ensure_topics no longer keeps the log forever: update kafka.yaml");
}

/// One KafkaUser (SCRAM-SHA-512) per service, with the ACLs for what the service does and no more,
/// and each Deployment authenticates as its user with the password from the user's Secret.
#[test]
fn each_service_authenticates_as_its_own_kafka_user_with_acls_limited_to_its_work() {
    let docs = k8s_documents();
    type Acls = BTreeMap<(String, String, String), BTreeSet<String>>;
    let acls = |user: &str| -> Acls {
        let u = find(&docs, "KafkaUser", user);
        assert_eq!(u["metadata"]["labels"]["strimzi.io/cluster"].as_str(), Some("taskstream"));
        assert_eq!(u["spec"]["authentication"]["type"].as_str(), Some("scram-sha-512"), "{user}");
        assert_eq!(u["spec"]["authorization"]["type"].as_str(), Some("simple"), "{user}");
        let mut out = Acls::new();
        for acl in u["spec"]["authorization"]["acls"].as_sequence().unwrap() {
            assert_ne!(acl["type"].as_str(), Some("deny"));
            let r = &acl["resource"];
            let key = (
                r["type"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap_or("").to_owned(),
                r["patternType"].as_str().unwrap_or("literal").to_owned(),
            );
            assert!(!key.1.is_empty() && key.1 != "*", "{user}: ACL on every {}", key.0);
            assert_ne!(key.0, "cluster", "{user}: no cluster-wide permission");
            out.entry(key).or_default().extend(acl["operations"].as_sequence().unwrap().iter().map(|o| o.as_str().unwrap().to_owned()));
        }
        out
    };
    let ops = |acls: &Acls, kind: &str, name: &str, pattern: &str| -> BTreeSet<String> {
        acls.get(&(kind.into(), name.into(), pattern.into())).cloned().unwrap_or_default()
    };
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    for service in SERVICES {
        let user = format!("taskstream-{service}");
        let deployment = find(&docs, "Deployment", service);
        assert_eq!(env(deployment, "KAFKA_CONFIG_SASL_USERNAME").and_then(|e| e["value"].as_str()), Some(user.as_str()), "{service}");
        let password =
            &env(deployment, "KAFKA_CONFIG_SASL_PASSWORD").unwrap_or_else(|| panic!("{service}: no KAFKA_CONFIG_SASL_PASSWORD"))["valueFrom"]["secretKeyRef"];
        assert_eq!(password["name"].as_str(), Some(user.as_str()), "{service}: the User Operator's Secret of the KafkaUser");
        assert_eq!(password["key"].as_str(), Some("password"));
        // The cluster CA, mounted where KAFKA_CONFIG_SSL_CA_LOCATION says.
        let ca = setting(&docs, deployment, "KAFKA_CONFIG_SSL_CA_LOCATION").expect("KAFKA_CONFIG_SSL_CA_LOCATION");
        let mount = container(deployment)["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| ca.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{service}: {ca} is not mounted"));
        let volume = deployment["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("taskstream-cluster-ca-cert"), "{service}: Strimzi's cluster CA Secret");
        assert!(ca.ends_with(volume["secret"]["items"][0]["path"].as_str().unwrap()));
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"]["taskstream.io/kafka-client"].as_str(),
            Some("true"),
            "{service}: the listener admits only labelled pods"
        );
    }

    // The command API: transactional ids <prefix>-p<N>, groups <prefix>, <prefix>-p<N>-<purpose>
    // and taskstream-command-api-owners-<instance>.
    let command = acls("taskstream-command-api");
    let prefix = setting(&docs, find(&docs, "Deployment", "command-api"), "KAFKA_TRANSACTIONAL_ID").expect("KAFKA_TRANSACTIONAL_ID");
    assert_eq!(ops(&command, "transactionalId", &prefix, "prefix"), set(&["Describe", "Write"]));
    assert_eq!(ops(&command, "group", &prefix, "prefix"), set(&["Describe", "Read"]));
    assert!(
        read("command-api/src/membership.rs").contains(&format!("format!(\"{prefix}-owners-{{}}\"")),
        "the owners reader's group is no longer under {prefix}"
    );
    assert_eq!(ops(&command, "topic", "task-events", "literal"), set(&["Create", "Describe", "Read", "Write"]));
    assert_eq!(ops(&command, "topic", "task-updates", "literal"), set(&["Create", "Describe", "Write"]));
    for t in ["task-events.owners", "task-events.snapshots"] {
        assert_eq!(ops(&command, "topic", t, "literal"), set(&["Create", "Describe", "Read", "Write"]), "{t}");
    }
    assert_eq!(ops(&command, "topic", "task-events.dlq", "literal"), set(&["Create", "Describe"]), "the command API writes no dead letters");

    // The projector: its group taskstream-projector.<topic>, the rebuild's taskstream-projector-rebuild.
    let projector = acls("taskstream-projector");
    assert_eq!(ops(&projector, "group", "taskstream-projector", "prefix"), set(&["Describe", "Read"]));
    assert!(read("projector/src/group.rs").contains("format!(\"taskstream-projector.{topic}\")"), "the projector's group changed: update its ACL");
    assert!(read("projector/src/rebuild.rs").contains("\"taskstream-projector-rebuild\""), "the rebuild's group changed: update its ACL");
    assert_eq!(ops(&projector, "topic", "task-events", "literal"), set(&["Create", "Describe", "Read"]), "the projector never writes the log");
    assert_eq!(ops(&projector, "topic", "task-events.dlq", "literal"), set(&["Create", "Describe", "Write"]));
    for t in ["task-events.owners", "task-events.snapshots", "task-updates"] {
        assert_eq!(ops(&projector, "topic", t, "literal"), set(&["Create", "Describe"]), "{t}: the projector only creates it when missing");
    }
    assert!(!projector.keys().any(|(kind, _, _)| kind == "transactionalId"));
    for (_, ops) in projector.iter().filter(|((kind, name, _), _)| kind == "topic" && name != "task-events.dlq") {
        assert!(!ops.contains("Write"), "the projector writes only dead letters");
    }

    // The query API only asks for watermarks.
    let query = acls("taskstream-query-api");
    assert_eq!(query.len(), 1);
    assert_eq!(ops(&query, "topic", "task-events", "literal"), set(&["Describe"]));
}

// --- the services ----------------------------------------------------------------------------

#[test]
fn kubernetes_manifests_run_several_partition_owning_command_apis() {
    let docs = k8s_documents();
    let writer = find(&docs, "Deployment", "command-api");
    assert!(writer["spec"]["replicas"].as_u64().unwrap_or(0) >= 2, "several command APIs share the partitions");
    assert_eq!(writer["spec"]["strategy"]["type"].as_str(), Some("RollingUpdate"));
    for var in ["COMMAND_API_INSTANCE_ID", "COMMAND_API_ADVERTISED_URL"] {
        assert!(env(writer, var).is_some(), "peers forward to {var}");
    }
    for name in SERVICES {
        assert!(docs.iter().any(|d| d["kind"] == "Service" && d["metadata"]["name"] == name), "{name} service missing");
    }
    assert_eq!(setting(&docs, find(&docs, "Deployment", "projector"), "COMMAND_API_URL").as_deref(), Some("http://command-api:8080"));
    // GET /v1/me/export is relayed to the query API.
    assert_eq!(setting(&docs, writer, "QUERY_API_URL").as_deref(), Some("http://query-api:8081"));
    let egress = serde_yaml::to_string(&find(&docs, "NetworkPolicy", "command-api")["spec"]["egress"]).unwrap();
    assert!(egress.contains("app: query-api") && egress.contains("port: 8081"), "the command API reaches the query API: {egress}");
}

/// Requests and limits, probes on /healthz and /readyz, a disruption budget and a network policy
/// for every service; the query API scales with an HPA; every setting a service reads exists.
#[test]
fn every_service_has_resources_probes_a_disruption_budget_and_a_network_policy() {
    let docs = k8s_documents();
    let matches = |selector: &Value, labels: &Value| {
        selector["matchLabels"].as_mapping().is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k.as_str().unwrap()] == *v))
    };
    for service in SERVICES {
        let d = find(&docs, "Deployment", service);
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let c = container(d);
        for (kind, which) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
            assert!(!c["resources"][kind][which].is_null(), "{service}: no resources.{kind}.{which}");
        }
        let port = |probe: &str, path: &str| {
            assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{service}: {probe}");
            c[probe]["httpGet"]["port"].clone()
        };
        let named = |p: Value| match p {
            Value::String(name) => {
                c["ports"].as_sequence().unwrap().iter().find(|q| q["name"].as_str() == Some(&name)).unwrap()["containerPort"].as_u64().unwrap()
            }
            other => other.as_u64().unwrap(),
        };
        let (live, ready) = (named(port("livenessProbe", "/healthz")), named(port("readinessProbe", "/readyz")));
        let addr_var = format!("{}_ADDR", service.replace('-', "_").to_uppercase());
        let addr = setting(&docs, d, &addr_var).unwrap_or_else(|| panic!("{service}: no {addr_var}"));
        assert_eq!(addr, format!("0.0.0.0:{live}"), "{service}: probes on the port it listens on");
        assert_eq!(live, ready);

        let pdb = docs
            .iter()
            .find(|x| x["kind"] == "PodDisruptionBudget" && matches(&x["spec"]["selector"], labels))
            .unwrap_or_else(|| panic!("{service}: no PodDisruptionBudget"));
        assert!(!pdb["spec"]["maxUnavailable"].is_null() || !pdb["spec"]["minAvailable"].is_null());
        let policy = docs
            .iter()
            .find(|x| x["kind"] == "NetworkPolicy" && matches(&x["spec"]["podSelector"], labels))
            .unwrap_or_else(|| panic!("{service}: no NetworkPolicy"));
        let types: BTreeSet<&str> = policy["spec"]["policyTypes"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(types, BTreeSet::from(["Egress", "Ingress"]), "{service}: both directions limited");
        let egress = serde_yaml::to_string(&policy["spec"]["egress"]).unwrap();
        assert!(egress.contains("port: 9093") && egress.contains("port: 53"), "{service}: egress to Kafka and DNS");
        let ingress_ports = serde_yaml::to_string(&policy["spec"]["ingress"]).unwrap();
        assert!(ingress_ports.contains(&format!("port: {live}")), "{service}: ingress to its port");
    }
    // PostgreSQL for the services that use it; the projector reaches the command API (reactions).
    for service in ["projector", "query-api"] {
        let policy = find(&docs, "NetworkPolicy", service);
        assert!(serde_yaml::to_string(&policy["spec"]["egress"]).unwrap().contains("cnpg.io/cluster: taskstream-pg"), "{service}: egress to PostgreSQL");
        let url = setting(&docs, find(&docs, "Deployment", service), "DATABASE_URL").unwrap();
        assert!(url.contains("@taskstream-pg-rw:5432/taskstream"), "{service}: DATABASE_URL {url}");
    }
    assert!(serde_yaml::to_string(&find(&docs, "NetworkPolicy", "projector")["spec"]["egress"]).unwrap().contains("app: command-api"));

    let hpa = docs.iter().find(|x| x["kind"] == "HorizontalPodAutoscaler").expect("an HPA");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some("query-api"));
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);

    let pg = docs.iter().find(|x| x["kind"] == "Cluster").expect("a CloudNativePG Cluster");
    assert_eq!(pg["metadata"]["name"].as_str(), Some("taskstream-pg"));
    assert_eq!(pg["spec"]["instances"].as_u64(), Some(3));
    assert_eq!(pg["spec"]["bootstrap"]["initdb"]["database"].as_str(), Some("taskstream"));
    assert_eq!(pg["spec"]["bootstrap"]["initdb"]["secret"]["name"].as_str(), Some("taskstream-pg-owner"));
}

/// No deploy file holds a usable default for a secret: compose requires the JWT secrets from the
/// environment (`${VAR:?...}`, no `:-default`), the Kubernetes manifests define no Secret and take
/// every credential from a secretKeyRef, and none of the well-known defaults the services refuse
/// appears anywhere.
#[test]
fn deploy_files_hold_no_default_secrets() {
    const SECRETS: [&str; 3] = ["AUTH_JWT_SECRET", "SERVICE_JWT_SECRET", "TASKSTREAM_KEK"];

    let mut compose: Value = serde_yaml::from_str(&read("deploy/docker-compose.yml")).unwrap();
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
    assert_eq!(seen, 7, "the three services get AUTH_JWT_SECRET (the shared block), command-api and projector SERVICE_JWT_SECRET and TASKSTREAM_KEK");

    let docs = k8s_documents();
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"), "the manifests must not define a Secret (with placeholder values)");
    let mut refs = 0;
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        for container in d["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers") {
            for env in container["env"].as_sequence().into_iter().flatten() {
                let name = env["name"].as_str().unwrap();
                if SECRETS.contains(&name) {
                    refs += 1;
                    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("taskstream"), "{env:?}");
                }
                if name.contains("SECRET") || name.contains("PASSWORD") {
                    assert!(env.get("value").is_none() && !env["valueFrom"]["secretKeyRef"].is_null(), "{name}: a credential not from a Secret");
                }
            }
        }
    }
    assert_eq!(refs, 6, "each service reads its JWT secrets (and the command API and projector the KEK) from the Secret");
    for c in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        for (key, _) in c["data"].as_mapping().into_iter().flatten() {
            let key = key.as_str().unwrap();
            assert!(!key.contains("SECRET") && !key.contains("PASSWORD"), "{key} in a ConfigMap");
        }
    }
    // The Dapr component reads its credentials from Secrets too.
    let component = docs.iter().find(|d| d["kind"] == "Component").expect("Dapr Component");
    for m in component["spec"]["metadata"].as_sequence().unwrap() {
        if m["name"].as_str().is_some_and(|n| n.to_lowercase().contains("password")) {
            assert!(m.get("value").is_none() && !m["secretKeyRef"].is_null(), "{m:?}");
        }
    }

    // No value anywhere (comments and Secret key names aside) is one of the defaults the services refuse.
    fn scalars(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Sequence(items) => items.iter().for_each(|i| scalars(i, out)),
            // `key: password` names an entry of a Secret (secretKeyRef, items), and the Dapr
            // component's `authType: password` a kind of authentication: neither is a secret.
            Value::Mapping(m) if m.get("name").and_then(Value::as_str) == Some("authType") => {}
            Value::Mapping(m) => m.iter().filter(|(k, _)| k.as_str() != Some("key")).for_each(|(_, v)| scalars(v, out)),
            Value::Tagged(t) => scalars(&t.value, out),
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

// --- monitoring and Dapr ---------------------------------------------------------------------

/// The metric names the services register (`counter!("name"`, `gauge!(`, `histogram!(`), by kind.
fn exported_metrics() -> BTreeMap<String, &'static str> {
    fn scan(dir: &Path, out: &mut BTreeMap<String, &'static str>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scan(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (macro_name, kind) in [("counter!(", "counter"), ("gauge!(", "gauge"), ("histogram!(", "histogram")] {
                    for (at, _) in text.match_indices(macro_name) {
                        let rest = text[at + macro_name.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                            out.insert(name.to_owned(), kind);
                        }
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for dir in ["command-api/src", "projector/src", "query-api/src", "platform/src"] {
        scan(&root().join(dir), &mut out);
    }
    out
}

/// The metric names a PromQL expression reads: identifiers that are neither functions, aggregation
/// operators, keywords, label names (in `by (...)`, `without (...)`, `on (...)`, ... or `{...}`),
/// strings, numbers nor durations.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const NOT_METRICS: [&str; 18] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let skip_to = |from: usize, open: char, close: char| {
        let mut depth = 0;
        for (i, &c) in chars.iter().enumerate().skip(from) {
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
        }
        chars.len()
    };
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = chars.iter().skip(i + 1).position(|&d| d == '"').map_or(chars.len(), |p| i + p + 2);
        } else if c == '{' {
            i = skip_to(i, '{', '}');
        } else if c == '[' {
            i = skip_to(i, '[', ']');
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (word_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if word_char(c) {
            let start = i;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = (i..chars.len()).find(|&j| !chars[j].is_whitespace());
            let call = next.is_some_and(|j| chars[j] == '(');
            if LABEL_LISTS.contains(&word.as_str()) && call {
                i = skip_to(next.unwrap(), '(', ')');
            } else if !call && !NOT_METRICS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_extraction_skips_functions_labels_and_durations() {
    let got = promql_metrics("histogram_quantile(0.95, sum by (namespace, le) (rate(command_duration_seconds_bucket{a=\"b\"}[5m]))) > 1");
    assert_eq!(got, BTreeSet::from(["command_duration_seconds_bucket".to_owned()]));
    let got = promql_metrics("sum by (ns) (rate(commands_total{result=\"unavailable\"}[5m])) / sum by (ns) (rate(commands_total[5m])) > 0.05");
    assert_eq!(got, BTreeSet::from(["commands_total".to_owned()]));
    let got = promql_metrics("max by (namespace, projection) (sum by (namespace, pod, projection) (projection_lag)) > 1000 and on (namespace) up == 1");
    assert_eq!(got, BTreeSet::from(["projection_lag".to_owned(), "up".to_owned()]));
}

/// Every alert reads metrics the services export (a histogram through _bucket, _sum or _count),
/// and the four alerts the design asks for exist.
#[test]
fn alerts_name_only_metrics_the_services_export() {
    let docs = k8s_documents();
    let exported = exported_metrics();
    for required in ["projection_lag", "commands_total", "command_duration_seconds", "projector_dead_letters"] {
        assert!(exported.contains_key(required), "the services no longer export {required}");
    }
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    let mut alerts = BTreeMap::new();
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for r in group["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            let metrics = promql_metrics(expr);
            assert!(!metrics.is_empty(), "{expr}: reads no metric?");
            for m in &metrics {
                let (base, kind) = match m.rsplit_once('_') {
                    Some((base, "bucket" | "sum" | "count")) if exported.get(base) == Some(&"histogram") => (base, "histogram"),
                    _ => (m.as_str(), "counter or gauge"),
                };
                let actual = exported.get(base).copied();
                assert!(actual.is_some(), "alert {:?} reads {m}, which no service exports (exported: {:?})", r["alert"], exported.keys().collect::<Vec<_>>());
                assert!(kind == "histogram" || actual != Some("histogram"), "{m} is a histogram: read it through _bucket/_sum/_count");
            }
            alerts.insert(r["alert"].as_str().unwrap().to_owned(), (expr.to_owned(), r["for"].as_str().unwrap_or("").to_owned()));
        }
    }
    let alert = |metric: &str| alerts.values().find(|(e, _)| e.contains(metric)).unwrap_or_else(|| panic!("no alert on {metric}"));
    let (lag, lag_for) = alert("projection_lag");
    assert!(lag.contains("> 1000") && lag_for == "5m", "consumer lag above 1000 for 5 minutes: {lag} for {lag_for}");
    let (publish, _) = alert("result=\"unavailable\"");
    assert!(publish.contains("> 0.05"), "publish failures above 5%: {publish}");
    let (latency, _) = alert("command_duration_seconds_bucket");
    assert!(latency.contains("histogram_quantile(0.95") && latency.contains("> 1"), "p95 command latency above 1 s: {latency}");
    let (dead, _) = alert("projector_dead_letters");
    assert!(dead.contains("> 0"), "dead letters present: {dead}");

    // The ServiceMonitor scrapes each service's Service on its http port.
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").expect("a ServiceMonitor");
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    for service in SERVICES {
        let s = find(&docs, "Service", service);
        assert!(selector.iter().all(|(k, v)| s["metadata"]["labels"][k.as_str().unwrap()] == *v), "the ServiceMonitor does not select {service}");
        let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
        assert!(s["spec"]["ports"].as_sequence().unwrap().iter().any(|p| p["name"].as_str() == Some(port)), "{service} has no port {port}");
    }
}

/// The Dapr example reads task-updates as its own KafkaUser and takes the records as they are
/// (rawPayload): taskstream's values are binary-mode CloudEvent data, not structured envelopes.
#[test]
fn the_dapr_subscriber_reads_task_updates_raw_as_a_read_only_user() {
    let docs = k8s_documents();
    let component = docs.iter().find(|d| d["kind"] == "Component").expect("Dapr Component");
    assert_eq!(component["spec"]["type"].as_str(), Some("pubsub.kafka"));
    let meta: BTreeMap<&str, &Value> = component["spec"]["metadata"].as_sequence().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m)).collect();
    let kafka = docs.iter().find(|d| d["kind"] == "Kafka").unwrap();
    let listener = &kafka["spec"]["kafka"]["listeners"][0];
    assert_eq!(meta["brokers"]["value"].as_str().map(str::to_owned), Some(format!("taskstream-kafka-bootstrap:{}", listener["port"].as_u64().unwrap())));
    assert_eq!(meta["authType"]["value"].as_str(), Some("password"));
    assert_eq!(meta["saslMechanism"]["value"].as_str(), Some("SHA-512"));
    let user = meta["saslUsername"]["value"].as_str().unwrap();
    assert_eq!(meta["saslPassword"]["secretKeyRef"]["name"].as_str(), Some(user));
    let acls = serde_yaml::to_string(&find(&docs, "KafkaUser", user)["spec"]["authorization"]["acls"]).unwrap();
    assert!(!acls.contains("Write"), "the Dapr reader must not write");
    let group = meta["consumerGroup"]["value"].as_str().unwrap();
    assert!(group.starts_with("taskstream-dapr-") && acls.contains("name: taskstream-dapr-"), "its group {group} is allowed");

    let subscription = docs.iter().find(|d| d["kind"] == "Subscription").expect("Dapr Subscription");
    assert_eq!(subscription["apiVersion"].as_str(), Some("dapr.io/v2alpha1"));
    assert_eq!(subscription["spec"]["pubsubname"], component["metadata"]["name"]);
    assert_eq!(subscription["spec"]["topic"].as_str(), Some("task-updates"));
    assert_eq!(subscription["spec"]["metadata"]["rawPayload"].as_str(), Some("true"));
}
