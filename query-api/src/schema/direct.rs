//! Pages answered without async-graphql's per-field machinery.
//!
//! async-graphql resolves each field of each object as a boxed future of its own, passed through
//! the extensions' resolve hooks (a registry lookup, a `ResolveInfo` and several allocations per
//! field): a page of 50 tasks is about 400 such futures, which `perf` showed to be ~40% of the
//! query API's CPU for a `tasks` page. The rows of a page are already in memory and their fields
//! are plain values, so [`DirectList`] writes a list's objects straight into the response when
//! their selection is made of plain fields only (the usual case), and leaves everything else
//! (fragments, a response key selected twice, a field an object does not answer directly) to
//! async-graphql, whole. The answer is the same either way (a test in `schema.rs` compares them);
//! what differs is that extensions' per-field `resolve` hooks do not see these fields (none of
//! this schema's extensions has one).
//!
//! Depends on async-graphql only; `schema.rs` implements [`DirectObject`] for its page types.

use std::borrow::Cow;

use async_graphql::indexmap::IndexMap;
use async_graphql::parser::types::{Field, Selection};
use async_graphql::registry::Registry;
use async_graphql::{ContextSelectionSet, OutputType, Positioned, ScalarType, ServerResult, Value};

/// An object whose fields are values already in memory.
pub trait DirectObject: OutputType {
    /// The value of the field named `name` (its GraphQL name), `selection` being the field's own
    /// selection (for a field that is an object); `None` leaves the object to async-graphql.
    fn field_value(&self, name: &str, selection: &ContextSelectionSet<'_>) -> Option<Value>;
}

/// The selected fields of `object`, in selection order, or `None` when the selection is not made
/// of plain fields that `object` answers directly.
pub fn object_value<T: DirectObject>(object: &T, selection: &ContextSelectionSet<'_>) -> Option<Value> {
    let items = &selection.item.node.items;
    let mut fields = IndexMap::with_capacity(items.len());
    for item in items {
        let Selection::Field(field) = &item.node else { return None };
        if !field.node.directives.is_empty() {
            return None;
        }
        let name = field.node.name.node.as_str();
        let value = if name == "__typename" {
            Value::String(object.introspection_type_name().into_owned())
        } else {
            object.field_value(name, &selection.with_selection_set(&field.node.selection_set))?
        };
        if fields.insert(field.node.response_key().node.clone(), value).is_some() {
            return None;
        }
    }
    Some(Value::Object(fields))
}

/// A scalar's value.
pub fn scalar<T: ScalarType>(value: &T) -> Value {
    value.to_value()
}

/// An optional scalar's value (`null` when absent).
pub fn optional<T: ScalarType>(value: &Option<T>) -> Value {
    value.as_ref().map_or(Value::Null, ScalarType::to_value)
}

/// A list of `T` in the schema (`[T!]!`, exactly as `Vec<T>`), answered directly when it can be.
#[derive(Debug)]
pub struct DirectList<T>(pub Vec<T>);

impl<T: DirectObject> OutputType for DirectList<T> {
    fn type_name() -> Cow<'static, str> {
        Vec::<T>::type_name()
    }

    fn qualified_type_name() -> String {
        Vec::<T>::qualified_type_name()
    }

    fn create_type_info(registry: &mut Registry) -> String {
        Vec::<T>::create_type_info(registry)
    }

    async fn resolve(&self, ctx: &ContextSelectionSet<'_>, field: &Positioned<Field>) -> ServerResult<Value> {
        match self.0.iter().map(|object| object_value(object, ctx)).collect::<Option<Vec<Value>>>() {
            Some(values) => Ok(Value::List(values)),
            None => self.0.resolve(ctx, field).await,
        }
    }
}
