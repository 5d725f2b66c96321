//! Introspection: GraphiQL can learn the schema under the default limits, which still hold.

use serde_json::json;

use crate::helpers::spawn_app;

/// What GraphiQL sends to learn the schema (graphql-js `getIntrospectionQuery`): depth 13.
pub const GRAPHIQL_INTROSPECTION: &str = r#"query IntrospectionQuery {
  __schema { queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType } directives { name description locations args { ...InputValue } } } }
fragment FullType on __Type { kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue } interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason } possibleTypes { ...TypeRef } }
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  ofType { kind name ofType { kind name ofType { kind name } } } } } } } }"#;

#[tokio::test]
async fn graphiql_can_introspect_the_schema_under_the_default_limits() {
    let app = spawn_app().await;
    let d = app.data("alice", GRAPHIQL_INTROSPECTION, json!({})).await;
    let types = d["__schema"]["types"].as_array().unwrap();
    for name in ["Task", "TaskConnection", "TaskEvent", "TaskStats", "ProjectionStatus", "DateTime", "JSON", "TaskOrder"] {
        assert!(types.iter().any(|t| t["name"] == name), "{name}");
    }
    // Introspection alone still has a limit: depth 16 (`__type`, 14 x `ofType`, `name`), not 17.
    let nest = |n: usize| format!("{{ __type(name: \"Task\") {{ {}name{} }} }}", "ofType { ".repeat(n), " }".repeat(n));
    let a = app.post("alice", &nest(14), json!({}), None).await;
    assert!(a.body.get("errors").is_none(), "{}", a.body);
    let a = app.post("alice", &nest(15), json!({}), None).await;
    assert!(a.message().contains("nested too deep"), "{}", a.body);
}
