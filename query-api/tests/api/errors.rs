//! Bad input (page sizes, cursors, depth and complexity, malformed or oversized requests) is a
//! clear error, never a 500.

use std::collections::HashMap;

use serde_json::{json, Value};

use query_api::Limits;

use crate::helpers::{base, spawn_app_with, FakeWatermarks, SeedTask};

#[tokio::test]
async fn bad_input_is_a_clear_error_never_a_500() {
    // A default page of cursors costs 50 x 2 (cost.rs); 41 aliases are over the default alias limit.
    let limits = Limits { max_depth: 6, max_complexity: 100, ..Limits::default() };
    let app = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await;
    for first in [-1, 201] {
        let a = app.post("alice", "query($f: Int) { tasks(first: $f) { edges { cursor } } }", json!({"f": first}), None).await;
        assert_eq!(a.status, 200);
        assert!(a.message().contains("`first` must be between 0 and 200"), "{}", a.body);
        assert_eq!(a.code(), Some("BAD_USER_INPUT"));
        let a = app.post("alice", "query($f: Int) { taskHistory(taskId: \"x\", first: $f) { edges { cursor } } }", json!({"f": first}), None).await;
        assert!(a.message().contains("`first` must be between 0 and 200"), "{}", a.body);
    }
    // A cursor must be one of ours, for the same order.
    app.seed(&SeedTask::new("alice", "a", base())).await;
    app.seed(&SeedTask::new("alice", "b", base())).await;
    let d = app.data("alice", "{ tasks(first: 1, orderBy: CREATED_AT_ASC) { pageInfo { endCursor } } }", json!({})).await;
    let cursor = d["tasks"]["pageInfo"]["endCursor"].as_str().unwrap().to_owned();
    for (order, after) in [("CREATED_AT_ASC", "bogus"), ("DUE_AT_ASC", cursor.as_str())] {
        let q = format!("query($a: String) {{ tasks(orderBy: {order}, after: $a) {{ edges {{ cursor }} }} }}");
        let a = app.post("alice", &q, json!({"a": after}), None).await;
        assert_eq!((a.status, a.code()), (200, Some("BAD_USER_INPUT")), "{}", a.body);
        assert!(a.message().contains("invalid cursor"), "{}", a.body);
    }
    let a = app.post("alice", "{ taskHistory(taskId: \"x\", after: \"bogus\") { edges { cursor } } }", json!({}), None).await;
    assert!(a.message().contains("invalid cursor"), "{}", a.body);
    // Depth and complexity limits (depth 8 > 6, here reached through introspection next to data).
    let deep = "{ stats { total } __schema { types { fields { type { ofType { ofType { name } } } } } } }";
    let a = app.post("alice", deep, json!({}), None).await;
    assert!(a.status == 200 && a.message().contains("nested too deep"), "{}", a.body);
    let wide: String = (0..41).map(|i| format!("s{i}: stats {{ total }} ")).collect();
    let a = app.post("alice", &format!("{{ {wide} }}"), json!({}), None).await;
    assert!(a.status == 200 && a.message().contains("too complex"), "{}", a.body);
    let a = app.post("alice", "{ nope }", json!({}), None).await;
    assert!(a.status == 200 && a.body["errors"].is_array() && a.body.get("data").is_none_or(Value::is_null), "{}", a.body);
    // Not a GraphQL request, or too large: refused at the door with our error shape.
    let a = app.post_raw(Some(&app.bearer("alice")), None, "{not json").await;
    assert_eq!((a.status, a.code()), (400, Some("BAD_REQUEST")), "{}", a.body);
    let huge = json!({"query": format!("{{ stats {{ total }} }} #{}", "x".repeat(300 * 1024))}).to_string();
    let a = app.post_raw(Some(&app.bearer("alice")), None, huge).await;
    assert_eq!(a.status, 413, "{}", a.body);
}
