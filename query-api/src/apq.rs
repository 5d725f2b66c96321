//! Automatic persisted queries (Apollo's APQ protocol, which Apollo Client, urql, graphql-request
//! and others speak): a client sends `extensions.persistedQuery = {"version": 1, "sha256Hash": ..}`
//! without the document; an unknown hash is answered with the error `PersistedQueryNotFound`
//! (`extensions.code = PERSISTED_QUERY_NOT_FOUND`), after which the client sends the hash with the
//! document once, which registers it. Over `POST /graphql` and `GET /graphql?extensions=..`.
//!
//! The protocol is async-graphql's extension (`ApolloPersistedQueries`); what this module adds is
//! its storage, [`PersistedQueries`] (a moka cache bounded by an estimate of the memory the parsed
//! documents hold, least recently used first out), and [`PersistedQueryCodes`], the extension that
//! gives the protocol's errors an `extensions.code`. A persisted document goes through the same
//! limits (cost, aliases, root fields, depth) as one sent in full.
//!
//! [`ParsedDocuments`] keeps the documents sent in full, parsed, by their text, with the same
//! bound: async-graphql parses the text of every request, and clients send the same few documents
//! again and again (perf of a 50-item `tasks` page: parsing was ~8% of the query API's CPU).

use std::sync::Arc;

use async_graphql::extensions::apollo_persisted_queries::CacheStorage;
use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest};
use async_graphql::parser::types::{Directive, ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Name, Positioned, Request, ServerResult, Value};

/// `extensions.code` of a hash this query API does not know (the client then sends the document).
pub const PERSISTED_QUERY_NOT_FOUND: &str = "PERSISTED_QUERY_NOT_FOUND";

/// The documents registered by hash (clones share them).
#[derive(Clone)]
pub struct PersistedQueries {
    cache: moka::future::Cache<String, ExecutableDocument>,
}

impl PersistedQueries {
    /// A cache holding documents of at most about `max_bytes` in all.
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder().max_capacity(max_bytes).weigher(|hash: &String, doc: &ExecutableDocument| weight(hash, doc)).build();
        Self { cache }
    }

    /// The document a request names only by its hash, when it is registered.
    pub async fn document_of(&self, request: &Request) -> Option<ExecutableDocument> {
        if !request.query.is_empty() {
            return None;
        }
        let Some(Value::Object(persisted)) = request.extensions.get("persistedQuery") else { return None };
        let Some(Value::String(hash)) = persisted.get("sha256Hash") else { return None };
        self.cache.get(hash).await
    }
}

#[async_trait::async_trait]
impl CacheStorage for PersistedQueries {
    async fn get(&self, key: String) -> Option<ExecutableDocument> {
        self.cache.get(&key).await
    }

    async fn set(&self, key: String, query: ExecutableDocument) {
        self.cache.insert(key, query).await;
    }
}

/// Parsed documents by their text, bounded by the same estimate of their memory as
/// [`PersistedQueries`] (clones share them). A document is only the parsed text: the limits, the
/// validation and the execution still run on every request.
#[derive(Clone)]
pub struct ParsedDocuments {
    cache: moka::future::Cache<String, ExecutableDocument>,
}

impl ParsedDocuments {
    /// A cache holding documents of at most about `max_bytes` in all (their text counted).
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder().max_capacity(max_bytes).weigher(|text: &String, doc: &ExecutableDocument| weight(text, doc)).build();
        Self { cache }
    }

    /// Gives `request` the parsed document of its text: kept from an earlier request, or parsed now
    /// and kept. A request without a text (a persisted query's hash) or whose text does not parse
    /// is left as it is, for async-graphql to answer as before.
    pub async fn parse(&self, request: &mut Request) {
        if request.query.is_empty() {
            return;
        }
        if let Some(doc) = self.cache.get(request.query.as_str()).await {
            request.set_parsed_query(doc);
        } else if let Ok(doc) = request.parsed_query() {
            let doc = doc.clone();
            self.cache.insert(request.query.clone(), doc).await;
        }
    }
}

/// Bytes counted per node of a document (a field, an argument, a fragment...), besides its names
/// and values: about what the parser's structures take.
const NODE_BYTES: usize = 128;

/// An estimate of the memory a parsed document holds: [`NODE_BYTES`] per node plus its names and
/// argument values as written (a long string argument weighs its length).
fn weight(hash: &str, doc: &ExecutableDocument) -> u32 {
    fn arguments<V: std::fmt::Display>(args: &[(Positioned<Name>, Positioned<V>)]) -> usize {
        args.iter().map(|(name, value)| NODE_BYTES + name.node.len() + value.node.to_string().len()).sum()
    }
    fn directives(ds: &[Positioned<Directive>]) -> usize {
        ds.iter().map(|d| NODE_BYTES + d.node.name.node.len() + arguments(&d.node.arguments)).sum()
    }
    fn selections(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| {
                NODE_BYTES
                    + match &item.node {
                        Selection::Field(f) => {
                            let f = &f.node;
                            f.alias.as_ref().map_or(0, |a| a.node.len())
                                + f.name.node.len()
                                + arguments(&f.arguments)
                                + directives(&f.directives)
                                + selections(&f.selection_set.node)
                        }
                        Selection::FragmentSpread(s) => s.node.fragment_name.node.len() + directives(&s.node.directives),
                        Selection::InlineFragment(f) => directives(&f.node.directives) + selections(&f.node.selection_set.node),
                    }
            })
            .sum()
    }
    let operations: usize = doc
        .operations
        .iter()
        .map(|(_, op)| {
            let op = &op.node;
            let variables: usize = op
                .variable_definitions
                .iter()
                .map(|v| NODE_BYTES + v.node.name.node.len() + v.node.default_value.as_ref().map_or(0, |d| d.node.to_string().len()))
                .sum();
            NODE_BYTES + variables + directives(&op.directives) + selections(&op.selection_set.node)
        })
        .sum();
    let fragments: usize =
        doc.fragments.iter().map(|(name, f)| NODE_BYTES + name.len() + directives(&f.node.directives) + selections(&f.node.selection_set.node)).sum();
    u32::try_from(hash.len() + operations + fragments).unwrap_or(u32::MAX)
}

/// Gives the errors of the persisted-query protocol an `extensions.code`: `PersistedQueryNotFound`
/// gets [`PERSISTED_QUERY_NOT_FOUND`] (what Apollo's clients look for, besides the message), and a
/// hash that does not match its document or a malformed `persistedQuery` get `BAD_REQUEST`.
/// Install it before `ApolloPersistedQueries`, so that it wraps it.
pub struct PersistedQueryCodes;

impl ExtensionFactory for PersistedQueryCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(PersistedQueryCodes)
    }
}

#[async_trait::async_trait]
impl Extension for PersistedQueryCodes {
    async fn prepare_request(&self, ctx: &ExtensionContext<'_>, request: Request, next: NextPrepareRequest<'_>) -> ServerResult<Request> {
        next.run(ctx, request).await.map_err(|mut e| {
            let code = if e.message == "PersistedQueryNotFound" { PERSISTED_QUERY_NOT_FOUND } else { "BAD_REQUEST" };
            let extensions = e.extensions.get_or_insert_with(Default::default);
            if extensions.get("code").is_none() {
                extensions.set("code", code);
            }
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_weighs_its_nodes_and_what_is_written_in_it() {
        let small = async_graphql::parser::parse_query("{ stats { total } }").unwrap();
        let long = format!("{{ tasks(filter: {{search: \"{}\"}}) {{ edges {{ node {{ id }} }} }} }}", "x".repeat(100_000));
        let long = async_graphql::parser::parse_query(long).unwrap();
        let (small, long) = (weight("h", &small), weight("h", &long));
        assert!((2 * NODE_BYTES as u32..1_000).contains(&small), "{small}");
        assert!(long > 100_000, "{long}");
    }

    #[tokio::test]
    async fn a_text_sent_again_gets_the_document_parsed_the_first_time() {
        let documents = ParsedDocuments::new(1 << 20);
        let text = "query Page($n: Int) { tasks(first: $n) { edges { node { id } } } }";
        let mut first = Request::new(text);
        documents.parse(&mut first).await;
        documents.cache.run_pending_tasks().await;
        assert_eq!(documents.cache.entry_count(), 1);
        let mut again = Request::new(text);
        documents.parse(&mut again).await;
        let (a, b) = (first.parsed_query().unwrap(), again.parsed_query().unwrap());
        assert_eq!(format!("{a:?}"), format!("{:?}", async_graphql::parser::parse_query(text).unwrap()));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        // Neither a text that does not parse nor a request without a text is kept.
        for mut request in [Request::new("{ tasks("), Request::new("")] {
            documents.parse(&mut request).await;
        }
        documents.cache.run_pending_tasks().await;
        assert_eq!(documents.cache.entry_count(), 1);
    }
}
