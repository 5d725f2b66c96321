//! The in-memory states of a partition's streams, one map per registered aggregate (a small type
//! map keyed by the decider's type), the batch overlay that decisions stage into (`Layered`), and
//! their snapshot form.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;

use domain::{Aggregates, Decider, DeciderVisitor, DomainEvent, StreamId, UserId};

pub type Subject<D> = <<D as Decider>::Event as DomainEvent>::Subject;

/// Applies one accepted event to its stream's state (and to no other stream's: every command is
/// decided from its own stream); returns the stream's version after it. The live path and the
/// restore both go through here.
pub fn apply_event<D: Decider>(streams: &mut Layered<'_>, id: &Subject<D>, actor: &UserId, event: &D::Event) -> u32 {
    let state = streams.state::<D>(id);
    *state = D::evolve(std::mem::take(state), actor, event);
    D::version(state)
}

/// The states of every stream, one map per aggregate (keyed by the decider's type).
#[derive(Default)]
pub struct States(HashMap<TypeId, Box<dyn AnyStreams>>);

/// One aggregate's states by stream id.
struct Streams<D: Decider>(HashMap<Subject<D>, D::State>, PhantomData<fn() -> D>);

trait AnyStreams: Send {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn len(&self) -> usize;
    /// Moves every state into `into`, replacing what it held for the same streams.
    fn merge_into(self: Box<Self>, into: &mut States);
}

impl<D: Decider> AnyStreams for Streams<D> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn merge_into(self: Box<Self>, into: &mut States) {
        into.of::<D>().extend(self.0);
    }
}

impl States {
    fn get<D: Decider>(&self) -> Option<&HashMap<Subject<D>, D::State>> {
        self.0.get(&TypeId::of::<D>()).and_then(|s| s.as_any().downcast_ref::<Streams<D>>()).map(|s| &s.0)
    }

    fn of<D: Decider>(&mut self) -> &mut HashMap<Subject<D>, D::State> {
        let streams = self.0.entry(TypeId::of::<D>()).or_insert_with(|| Box::new(Streams::<D>(HashMap::new(), PhantomData)));
        &mut streams.as_any_mut().downcast_mut::<Streams<D>>().expect("keyed by the decider's type").0
    }

    /// Takes over every state of `staged` (a batch made durable).
    pub fn absorb(&mut self, staged: States) {
        for (_, streams) in staged.0 {
            streams.merge_into(self);
        }
    }

    pub fn len(&self) -> usize {
        self.0.values().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The snapshot form: `{"<aggregate>": [[stream id, state], ...], ...}`.
    pub fn to_snapshot(&self) -> serde_json::Value {
        struct Collect<'a>(&'a States, serde_json::Map<String, serde_json::Value>);
        impl DeciderVisitor for Collect<'_> {
            fn decider<D: Decider>(&mut self, name: &'static str) {
                let Some(streams) = self.0.get::<D>() else { return };
                let rows: Vec<serde_json::Value> = streams
                    .iter()
                    .filter_map(|(id, state)| Some(serde_json::Value::Array(vec![id.to_string().into(), serde_json::to_value(state).ok()?])))
                    .collect();
                self.1.insert(name.to_owned(), rows.into());
            }
        }
        let mut c = Collect(self, serde_json::Map::new());
        Aggregates::visit(&mut c);
        serde_json::Value::Object(c.1)
    }

    /// Reads the snapshot form back (an aggregate the snapshot does not name starts empty).
    pub fn from_snapshot(mut value: serde_json::Value) -> Result<States, String> {
        struct Load<'a>(&'a mut serde_json::Value, States, Option<String>);
        impl DeciderVisitor for Load<'_> {
            fn decider<D: Decider>(&mut self, name: &'static str) {
                let Some(serde_json::Value::Array(rows)) = self.0.get_mut(name).map(serde_json::Value::take) else { return };
                let map = self.1.of::<D>();
                map.reserve(rows.len());
                for row in rows {
                    let parsed = serde_json::from_value::<(String, D::State)>(row).map_err(|e| e.to_string()).and_then(|(id, state)| {
                        Ok((<Subject<D> as StreamId>::parse_subject(&id).map_err(|e| format!("stream id {id}: {}", e.0))?, state))
                    });
                    match parsed {
                        Ok((id, state)) => {
                            map.insert(id, state);
                        }
                        Err(e) => {
                            self.2.get_or_insert(format!("{name}: {e}"));
                        }
                    }
                }
            }
        }
        let mut l = Load(&mut value, States::default(), None);
        Aggregates::visit(&mut l);
        match l.2 {
            Some(e) => Err(e),
            None => Ok(l.1),
        }
    }
}

/// A batch's staged states over the committed ones: reads see staged first, writes go to staged.
pub struct Layered<'a> {
    pub committed: Option<&'a States>,
    pub staged: &'a mut States,
}

impl Layered<'_> {
    pub fn is_staged<D: Decider>(&self, id: &Subject<D>) -> bool {
        self.staged.get::<D>().is_some_and(|m| m.contains_key(id))
    }

    /// The stream's current state, to decide on (nothing is staged for a refused command).
    pub fn current<D: Decider>(&self, id: &Subject<D>) -> D::State {
        let staged = self.staged.get::<D>().and_then(|m| m.get(id));
        staged.or_else(|| self.committed.and_then(|c| c.get::<D>()).and_then(|m| m.get(id))).cloned().unwrap_or_default()
    }

    /// The stream's state to evolve (copied from the committed state on first touch).
    pub fn state<D: Decider>(&mut self, id: &Subject<D>) -> &mut D::State {
        let committed = self.committed;
        self.staged.of::<D>().entry(id.clone()).or_insert_with(|| committed.and_then(|c| c.get::<D>()).and_then(|m| m.get(id)).cloned().unwrap_or_default())
    }
}
