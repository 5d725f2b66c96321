//! The cost model of a query, enforced before anything runs.
//!
//! The cost is async-graphql's own complexity: every selected field costs one, and a list field
//! multiplies the cost of its subtree by the rows it may return (`first`, or its default, capped
//! at the largest page; see the `complexity` attributes in `schema.rs`), so nested lists multiply.
//! The schema is built without `limit_complexity`: [`CostLimit`] reads the computed cost in the
//! validation hook instead, so that a refused query says what it cost, what the limit is, and
//! carries `extensions.code = QUERY_TOO_COMPLEX`. Counting rows does not bound a document made
//! of many cheap fields, so the same extension also limits the aliases of a document and the root
//! fields of each operation, right after parsing.

use std::collections::HashSet;
use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation};
use async_graphql::parser::types::{ExecutableDocument, FragmentDefinition, Selection, SelectionSet};
use async_graphql::{Name, Pos, Positioned, ServerError, ServerResult, ValidationResult, Variables};

use crate::error::user_error;

/// `extensions.code` of a refused query.
pub const QUERY_TOO_COMPLEX: &str = "QUERY_TOO_COMPLEX";

/// The limits of one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostLimits {
    /// Largest allowed cost (async-graphql's complexity, list sizes counted).
    pub max_cost: usize,
    /// Most aliased fields in a document (operations and fragments together).
    pub max_aliases: usize,
    /// Most fields at the root of one operation (fragments at the root expanded).
    pub max_root_fields: usize,
}

/// The extension enforcing [`CostLimits`]; install it with `SchemaBuilder::extension`.
pub struct CostLimit(pub CostLimits);

impl ExtensionFactory for CostLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(CostLimitExtension(self.0))
    }
}

struct CostLimitExtension(CostLimits);

/// A refusal of the whole document (no location in it).
fn too_complex(message: String) -> ServerError {
    let mut e = user_error(QUERY_TOO_COMPLEX, format!("the query is too complex: {message}")).into_server_error(Pos::default());
    e.locations.clear();
    e
}

#[async_graphql::async_trait::async_trait]
impl Extension for CostLimitExtension {
    async fn parse_query(&self, ctx: &ExtensionContext<'_>, query: &str, variables: &Variables, next: NextParseQuery<'_>) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        let limits = self.0;
        let aliases = aliases(&doc);
        if aliases > limits.max_aliases {
            return Err(too_complex(format!("it has {aliases} aliases, the limit is {}", limits.max_aliases)));
        }
        let roots = root_fields(&doc);
        if roots > limits.max_root_fields {
            return Err(too_complex(format!("an operation selects {roots} root fields, the limit is {}", limits.max_root_fields)));
        }
        Ok(doc)
    }

    async fn validation(&self, ctx: &ExtensionContext<'_>, next: NextValidation<'_>) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        if result.complexity > self.0.max_cost {
            return Err(vec![too_complex(format!("its cost is {}, the limit is {}", result.complexity, self.0.max_cost))]);
        }
        Ok(result)
    }
}

/// Aliased fields anywhere in the document.
fn aliases(doc: &ExecutableDocument) -> usize {
    fn count(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(f) => usize::from(f.node.alias.is_some()) + count(&f.node.selection_set.node),
                Selection::InlineFragment(f) => count(&f.node.selection_set.node),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    doc.operations.iter().map(|(_, op)| count(&op.node.selection_set.node)).sum::<usize>()
        + doc.fragments.values().map(|f| count(&f.node.selection_set.node)).sum::<usize>()
}

/// The most root fields of one operation, fragments spread at the root counted by their fields
/// (each fragment once per path, so a cycle, refused later by validation, cannot loop here).
fn root_fields(doc: &ExecutableDocument) -> usize {
    fn count<'a>(set: &'a SelectionSet, fragments: &'a std::collections::HashMap<Name, Positioned<FragmentDefinition>>, seen: &mut HashSet<&'a str>) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(_) => 1,
                Selection::InlineFragment(f) => count(&f.node.selection_set.node, fragments, seen),
                Selection::FragmentSpread(s) => {
                    let name = s.node.fragment_name.node.as_str();
                    match fragments.get(&s.node.fragment_name.node) {
                        Some(f) if seen.insert(name) => {
                            let n = count(&f.node.selection_set.node, fragments, seen);
                            seen.remove(name);
                            n
                        }
                        _ => 0,
                    }
                }
            })
            .sum()
    }
    doc.operations.iter().map(|(_, op)| count(&op.node.selection_set.node, &doc.fragments, &mut HashSet::new())).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;

    use super::*;

    #[test]
    fn aliases_are_counted_everywhere_and_root_fields_per_operation() {
        let doc =
            parse_query("query A { a: stats { t: total } ...F } query B { stats { total } } fragment F on Query { b: stats { total } c: stats { total } }")
                .unwrap();
        assert_eq!(aliases(&doc), 4);
        assert_eq!(root_fields(&doc), 3);
        let cyclic = parse_query("{ ...F } fragment F on Query { stats { total } ...F }").unwrap();
        assert_eq!(root_fields(&cyclic), 1);
    }
}
