//! The Kafka adapter of a partition's log on the real broker. A writer restores its state by
//! reading its partition after fencing the previous owner; the read must not end while a
//! transaction is still open on the partition. The chaos run caught the defect: after a broker
//! kill, a transaction whose commit had timed out on the client was completed by the broker only
//! after the new producer's fencing returned, the read stopped at the last stable offset before
//! it, and the writer decided the same versions again (two `task.completed` at version 6).
//!
//! A transaction still open after fencing is one Kafka left open (seen after broker kills: a
//! marker missing, the coordinator done with it): the writer closes it with a barrier, whose commit
//! marker closes only a transaction of its own producer id, and only while it owns the partition.
//!
//! Needs `KAFKA_BROKERS` (`./dev test` provisions the broker).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use command_api::log::{EventLog, KafkaLog, KafkaLogSettings, LogError, Undecodable};
use command_api::Settings;
use platform::codec::DecodeError;
use platform::keys::{Keks, KeyRing};
use platform::retry::Policy;
use test_support::required_env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_read_does_not_end_while_a_transaction_is_open_on_the_partition() {
    let (settings, run) = topic_settings("open").await;
    let cleanup = settings.clone();

    // A transaction left open on partition 0, as a previous owner's commit that the broker has not
    // completed yet: its record is written, not committed.
    let open = open_transaction(&format!("kafkalog-open-{run}"), &settings.task_events_topic);

    let (mut log, _) = kafka_log(settings, &run);
    connect(&mut log).await;
    // While the transaction is open the partition is not fully read: the read fails (the writer
    // stays unavailable and tries again) instead of ending at the last stable offset.
    let (result, seen) = read_all(&mut log).await;
    assert!(
        matches!(&result, Err(LogError::Unavailable(m)) if m.contains("still open")),
        "a read that ended before the open transaction would miss it if it commits: {result:?}, read {seen:?}"
    );

    // The writer tried to close the transaction with a barrier: the barrier's marker closes only
    // a transaction of its own producer id, so this one stays open, and the next read does not
    // write another barrier for the same offset.
    let (result, _) = read_all(&mut log).await;
    assert!(matches!(&result, Err(LogError::Unavailable(m)) if m.contains("still open")), "{result:?}");

    // Once it commits, the read ends after it, with its record and the one barrier.
    open.commit_transaction(TIMEOUT).expect("commit");
    let (result, seen) = read_all(&mut log).await;
    let next = result.expect("the read ends once no transaction is open");
    let records: Vec<i64> = seen.iter().filter(|(_, barrier)| !barrier).map(|(o, _)| *o).collect();
    let barriers = seen.iter().filter(|(_, barrier)| *barrier).count();
    assert_eq!(records, vec![0], "the committed record is read: {seen:?}");
    assert_eq!(barriers, 1, "one barrier for the offset the transaction was stuck at: {seen:?}");
    assert!(next >= 4, "past the record, the barrier and both commit markers: {next}");
    platform::kafka::delete_topics(&cleanup).await;
}

/// A writer that lost the partition (another producer with its transactional id fenced it) must
/// not close the new owner's open transaction: its barrier is refused, and it learns it is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_cannot_close_the_new_owners_open_transaction() {
    let (settings, run) = topic_settings("fenced").await;
    let cleanup = settings.clone();
    let topic = settings.task_events_topic.clone();
    let (mut zombie, log_settings) = kafka_log(settings, &run);
    connect(&mut zombie).await;

    // The new owner: same transactional id, so its fencing bumps the epoch; its transaction is open.
    let owner = open_transaction(&log_settings.transactional_id(0), &topic);

    let (result, _) = read_all(&mut zombie).await;
    assert!(matches!(&result, Err(LogError::Fenced(_))), "the zombie must learn it is fenced, not close the transaction: {result:?}");
    owner.commit_transaction(TIMEOUT).expect("the owner's transaction commits");
    platform::kafka::delete_topics(&cleanup).await;
}

/// Connects the writer's producer, trying again while the broker answers that it is unavailable,
/// as the writer does. A broker that has just started is still loading its transaction
/// coordinator: fencing is answered `COORDINATOR_LOAD_IN_PROGRESS` until it is done (a CI run on a
/// fresh broker failed on it when this test connected once).
async fn connect(log: &mut KafkaLog) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Policy::new(Duration::from_millis(100), Duration::from_secs(2)).backoff();
    loop {
        match log.connect().await {
            Ok(()) => return,
            Err(LogError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("the writer's producer is not ready yet ({e}); trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => panic!("the writer's producer: {e:?}"),
        }
    }
}

/// A transactional producer `transactional_id` with one record written to partition 0 of `topic`
/// in a transaction it leaves open (commit or abort it with the returned producer).
fn open_transaction(transactional_id: &str, topic: &str) -> BaseProducer {
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", required_env("KAFKA_BROKERS")).set("transactional.id", transactional_id).create().expect("producer");
    producer.init_transactions(TIMEOUT).expect("init");
    producer.begin_transaction().expect("begin");
    producer.send(BaseRecord::<str, [u8]>::to(topic).partition(0).key("task").payload(b"{}".as_slice())).map_err(|(e, _)| e).expect("send");
    producer.flush(TIMEOUT).expect("written");
    producer
}

const TIMEOUT: Duration = Duration::from_secs(20);

/// The log of partition 0 (op timeout = transaction timeout / 2 = 2 s), and its settings.
fn kafka_log(settings: platform::settings::KafkaSettings, run: &str) -> (KafkaLog, KafkaLogSettings) {
    let keys = KeyRing::in_memory(Keks::parse(test_support::tokens::TEST_KEK).unwrap());
    let log_settings = KafkaLogSettings { kafka: settings, transactional_id_prefix: format!("kafkalog-{run}"), transaction_timeout: Duration::from_secs(4) };
    (KafkaLog::new(log_settings.clone(), 0, keys), log_settings)
}

/// The settings of a fresh one-partition topic, and the run id in its name. A test that passes
/// deletes its topics; a failing one leaves them to be looked at.
async fn topic_settings(name: &str) -> (platform::settings::KafkaSettings, String) {
    let brokers = required_env("KAFKA_BROKERS");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("task-events-kafkalog-{name}-{run}");
    let settings = Settings::try_parse_from([
        "command-api",
        "--kafka-brokers",
        &brokers,
        "--task-events-topic",
        &topic,
        "--task-events-partitions=1",
        "--auth-jwt-secret",
        test_support::tokens::USER_SECRET,
    ])
    .expect("settings")
    .kafka;
    platform::kafka::ensure_topics(&settings).await.expect("topics");
    (settings, run)
}

/// Reads the partition from offset 0: the result and the offsets of the records read (and whether
/// each is a barrier).
async fn read_all(log: &mut KafkaLog) -> (Result<i64, LogError>, Vec<(i64, bool)>) {
    let seen: Arc<Mutex<Vec<(i64, bool)>>> = Arc::default();
    let sink = seen.clone();
    let result = log
        .read_from(0, Box::new(move |pos, rec| sink.lock().unwrap().push((pos.offset, matches!(rec, Err(Undecodable { error: DecodeError::Barrier, .. }))))))
        .await;
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

/// After an append, `settle` returns once the transaction is closed in the partition (its commit
/// markers are written): the read_committed end is past the records. A transaction that another
/// producer keeps open after ours does not hold it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_returns_once_the_appended_transaction_is_closed_in_the_partition() {
    let (settings, run) = topic_settings("settle").await;
    let cleanup = settings.clone();
    let topic = settings.task_events_topic.clone();
    let (mut log, _) = kafka_log(settings, &run);
    connect(&mut log).await;
    assert!(log.settle().await.is_ok(), "nothing appended yet: nothing to wait for");

    let event = |key: &str| platform::codec::EncodedEvent {
        key: key.into(),
        payload: b"{}".to_vec(),
        headers: rdkafka::message::OwnedHeaders::new(),
        event_type: "test",
    };
    let positions = log.append(vec![event("a"), event("b")], vec![]).await.expect("appended");
    assert_eq!(positions.iter().map(|p| p.offset).collect::<Vec<_>>(), [0, 1]);
    log.settle().await.expect("the transaction closes");

    // Another producer's transaction open after ours: ours is closed all the same.
    let positions = log.append(vec![event("c")], vec![]).await.expect("appended");
    let other = open_transaction(&format!("kafkalog-other-{run}"), &topic);
    log.settle().await.expect("our transaction is closed although another is open after it");
    other.abort_transaction(TIMEOUT).expect("abort");
    assert!(positions[0].offset > 1);
    platform::kafka::delete_topics(&cleanup).await;
}
