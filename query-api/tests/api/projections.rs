//! `projections`: the stored offsets of every projection against the end of the log, also when
//! Kafka does not answer.

use std::collections::HashMap;

use serde_json::json;

use query_api::Limits;

use crate::helpers::{spawn_app_with, FakeWatermarks};

const PROJECTIONS: &str = "{ projections { name state lag partitions { partition offset highWatermark } } }";

#[tokio::test]
async fn projections_report_stored_offsets_against_the_end_of_the_log() {
    let app = spawn_app_with(Limits::default(), FakeWatermarks(Some(HashMap::from([(0, 12), (1, 4)])))).await;
    // Before the projector ever ran: every projection, live, nothing to report.
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    let names: Vec<&str> = d["projections"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, platform::projections::PROJECTIONS);
    for p in d["projections"].as_array().unwrap() {
        assert_eq!((&p["state"], &p["lag"], &p["partitions"]), (&json!("live"), &json!(0), &json!([])));
    }
    app.set_offset("tasks", 0, 10).await;
    app.set_offset("tasks", 1, 4).await;
    app.set_offset("task_history", 0, 7).await;
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    assert_eq!(
        d["projections"][0],
        json!({"name": "tasks", "state": "live", "lag": 1, "partitions": [
            {"partition": 0, "offset": 10, "highWatermark": 12}, {"partition": 1, "offset": 4, "highWatermark": 4}]})
    );
    assert_eq!(
        d["projections"][1],
        json!({"name": "task_history", "state": "live", "lag": 4, "partitions": [{"partition": 0, "offset": 7, "highWatermark": 12}]})
    );
}

#[tokio::test]
async fn projections_still_answer_when_kafka_does_not() {
    let app = spawn_app_with(Limits::default(), FakeWatermarks(None)).await;
    app.set_offset("tasks", 3, 10).await;
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    assert_eq!(d["projections"][0], json!({"name": "tasks", "state": "live", "lag": 0, "partitions": [{"partition": 3, "offset": 10, "highWatermark": 10}]}));
}
