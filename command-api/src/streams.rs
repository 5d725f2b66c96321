//! The in-memory states of a partition's streams, one map per registered aggregate (a small type
//! map keyed by the decider's type), the current state (`TaskView`) of every live task of the
//! partition (the value of its next `task-updates` record), the batch overlay that decisions stage
//! into (`Layered`), and their snapshot form.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;

use domain::current::TaskView;
use domain::{Aggregates, Decider, DeciderVisitor, DomainEvent, Envelope, StreamId, TaskDecider, TaskEvent, TaskId, UserId};
use platform::codec::DecodeError;
use platform::keys::{DataKeys, KeyError};
use serde_json::value::RawValue;
use uuid::Uuid;

pub type Subject<D> = <<D as Decider>::Event as DomainEvent>::Subject;

/// Applies one accepted event to its stream's state (and to no other stream's: every command is
/// decided from its own stream); returns the stream's version after it. The live path and the
/// restore both go through here.
pub fn apply_event<D: Decider>(streams: &mut Layered<'_>, id: &Subject<D>, actor: &UserId, event: &D::Event) -> u32 {
    let state = streams.state::<D>(id);
    *state = D::evolve(std::mem::take(state), actor, event);
    D::version(state)
}

/// The envelope as a task event's, if it is one (user-level events have no `task-updates` state).
pub fn as_task_event<E: DomainEvent>(env: &Envelope<E>) -> Option<&Envelope<TaskEvent>> {
    (env as &dyn Any).downcast_ref::<Envelope<TaskEvent>>()
}

/// Folds an accepted event into its task's current state (`TaskView`), if it is a task event, and
/// remembers the data key the task is sealed with (`ce_datakey` of its events) while it lives; the
/// live path (after `apply_event`) and the restore both go through here. Returns whether it was.
pub fn apply_view<E: DomainEvent>(streams: &mut Layered<'_>, env: &Envelope<E>) -> bool {
    let Some(env) = as_task_event(env) else { return false };
    let committed = streams.committed;
    let views = &mut streams.staged.views;
    let slot = views.entry(env.subject).or_insert_with(|| committed.and_then(|c| c.views.get(&env.subject)).cloned().flatten());
    *slot = TaskView::next(slot.take(), env);
    let live = slot.is_some();
    if !live && committed.is_none() {
        // Nothing underneath to shadow (a restore): a deleted task keeps nothing.
        views.remove(&env.subject);
    }
    let keys = &mut streams.staged.task_keys;
    match (live, env.meta.data_key) {
        (true, Some(key)) => {
            keys.insert(env.subject, Some(key));
        }
        (true, None) => {}
        (false, _) if committed.is_none() => {
            keys.remove(&env.subject);
        }
        (false, _) => {
            keys.insert(env.subject, None);
        }
    }
    true
}

/// The states of every stream, one map per aggregate (keyed by the decider's type), and the
/// current state of every live task.
#[derive(Default)]
pub struct States {
    streams: HashMap<TypeId, Box<dyn AnyStreams>>,
    /// By task: its `TaskView`; in a batch's staged states, `None` is a task the batch deleted (the
    /// committed states never hold a `None`: a deleted task keeps nothing here).
    views: HashMap<TaskId, Option<TaskView>>,
    /// By live task: the data key its personal fields are sealed with (in staged states, `None`: no
    /// longer known). A task whose key is destroyed was erased with its user.
    task_keys: HashMap<TaskId, Option<Uuid>>,
}

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
        self.streams.get(&TypeId::of::<D>()).and_then(|s| s.as_any().downcast_ref::<Streams<D>>()).map(|s| &s.0)
    }

    fn of<D: Decider>(&mut self) -> &mut HashMap<Subject<D>, D::State> {
        let streams = self.streams.entry(TypeId::of::<D>()).or_insert_with(|| Box::new(Streams::<D>(HashMap::new(), PhantomData)));
        &mut streams.as_any_mut().downcast_mut::<Streams<D>>().expect("keyed by the decider's type").0
    }

    /// Takes over every state of `staged` (a batch made durable).
    pub fn absorb(&mut self, staged: States) {
        for (_, streams) in staged.streams {
            streams.merge_into(self);
        }
        overlay(&mut self.views, staged.views);
        overlay(&mut self.task_keys, staged.task_keys);
    }

    /// Forgets every task whose data key is destroyed (its user was erased): after a snapshot is
    /// restored, and when a command meets one (`Layered::forget_task`). Returns how many.
    pub fn forget_erased(&mut self, keys: &dyn DataKeys) -> usize {
        let erased: Vec<TaskId> =
            self.task_keys.iter().filter_map(|(t, k)| k.filter(|k| matches!(keys.data_key(k), Err(KeyError::Erased(_)))).map(|_| *t)).collect();
        for t in &erased {
            self.task_keys.remove(t);
            self.views.remove(t);
            self.of::<TaskDecider>().remove(t);
        }
        erased.len()
    }

    /// How many streams (of every aggregate) there are.
    pub fn len(&self) -> usize {
        self.streams.values().map(|s| s.len()).sum()
    }

    /// How many live tasks have a current state.
    pub fn views(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The snapshot form: `{"<aggregate>": [[stream id, state], ...], ..., "task_views": [view, ...]}`,
    /// each view's personal fields sealed with its task's data key (named by its `data_key`); the
    /// views of tasks whose key is destroyed are left out.
    pub fn to_snapshot(&self, keys: &dyn DataKeys) -> serde_json::Value {
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
        // Each view as `[task id, data key, view]`: with a data key the whole view is one sealed
        // string (one AEAD operation, and the restore parses the opened JSON straight into a
        // `TaskView`); without one (tasks written before sealing) the view itself.
        let views: Vec<serde_json::Value> = self
            .views
            .values()
            .flatten()
            .filter_map(|v| {
                let (key, view) = match self.task_keys.get(&v.task_id).copied().flatten() {
                    Some(id) => (serde_json::Value::from(id.to_string()), keys.data_key(&id).ok()?.seal(&serde_json::to_string(v).ok()?).into()),
                    None => (serde_json::Value::Null, serde_json::to_value(v).ok()?),
                };
                Some(serde_json::Value::Array(vec![v.task_id.to_string().into(), key, view]))
            })
            .collect();
        c.1.insert(VIEWS_KEY.to_owned(), views.into());
        serde_json::Value::Object(c.1)
    }

    /// Reads the snapshot form back (an aggregate the snapshot does not name starts empty); the
    /// tasks whose data key is destroyed are forgotten.
    pub fn from_snapshot(raw: &RawValue, keys: &dyn DataKeys) -> Result<States, String> {
        // Each part is parsed straight into its types.
        let parts: HashMap<&str, &RawValue> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
        struct Load<'a>(&'a HashMap<&'a str, &'a RawValue>, States, Option<String>);
        impl DeciderVisitor for Load<'_> {
            fn decider<D: Decider>(&mut self, name: &'static str) {
                let Some(rows) = self.0.get(name) else { return };
                let parsed = serde_json::from_str::<Vec<(String, D::State)>>(rows.get()).map_err(|e| e.to_string()).and_then(|rows| {
                    rows.into_iter()
                        .map(|(id, state)| Ok((<Subject<D> as StreamId>::parse_subject(&id).map_err(|e| format!("stream id {id}: {}", e.0))?, state)))
                        .collect::<Result<HashMap<_, _>, String>>()
                });
                match parsed {
                    Ok(map) => *self.1.of::<D>() = map,
                    Err(e) => {
                        self.2.get_or_insert(format!("{name}: {e}"));
                    }
                }
            }
        }
        let mut l = Load(&parts, States::default(), None);
        Aggregates::visit(&mut l);
        if let Some(e) = l.2 {
            return Err(e);
        }
        let mut states = l.1;
        let Some(views) = parts.get(VIEWS_KEY) else {
            return Err(format!("the snapshot has no {VIEWS_KEY} (the tasks' current states)"));
        };
        let views: Vec<(TaskId, Option<Uuid>, &RawValue)> = serde_json::from_str(views.get()).map_err(|e| format!("{VIEWS_KEY}: {e}"))?;
        let mut erased = Vec::new();
        for (task, key, raw) in views {
            let view: TaskView = match key {
                Some(id) => {
                    let sealed: std::borrow::Cow<str> = serde_json::from_str(raw.get()).map_err(|e| format!("{VIEWS_KEY}: {e}"))?;
                    let opened = match keys.data_key(&id) {
                        Ok(k) => k.open(&sealed).map_err(|e| format!("{VIEWS_KEY}: {e}"))?,
                        Err(KeyError::Erased(_)) => {
                            erased.push(task);
                            continue;
                        }
                        Err(e) => return Err(format!("{VIEWS_KEY}: {}", DecodeError::from(e))),
                    };
                    serde_json::from_str(&opened)
                }
                None => serde_json::from_str(raw.get()),
            }
            .map_err(|e| format!("{VIEWS_KEY}: {e}"))?;
            if let Some(id) = key {
                states.task_keys.insert(view.task_id, Some(id));
            }
            states.views.insert(view.task_id, Some(view));
        }
        // An erased task's decider state goes with its view.
        for t in erased {
            states.of::<TaskDecider>().remove(&t);
        }
        Ok(states)
    }
}

/// Applies a batch's staged entries to the committed ones: a value replaces, `None` removes.
fn overlay<V>(committed: &mut HashMap<TaskId, Option<V>>, staged: HashMap<TaskId, Option<V>>) {
    for (id, v) in staged {
        match v {
            Some(v) => {
                committed.insert(id, Some(v));
            }
            None => {
                committed.remove(&id);
            }
        }
    }
}

/// Where the snapshot form keeps the tasks' current states.
const VIEWS_KEY: &str = "task_views";

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

    /// The task's current state (`None`: no such task, or deleted).
    pub fn view(&self, id: &TaskId) -> Option<&TaskView> {
        match self.staged.views.get(id) {
            Some(staged) => staged.as_ref(),
            None => self.committed.and_then(|c| c.views.get(id)).and_then(Option::as_ref),
        }
    }

    /// The data key the task is sealed with, while it lives.
    pub fn task_key(&self, id: &TaskId) -> Option<Uuid> {
        match self.staged.task_keys.get(id) {
            Some(staged) => *staged,
            None => self.committed.and_then(|c| c.task_keys.get(id)).copied().flatten(),
        }
    }

    /// Forgets a task whose user was erased (its data key is destroyed): from now on it does not
    /// exist, and its id may be used again.
    pub fn forget_task(&mut self, id: &TaskId) {
        *self.state::<TaskDecider>(id) = Default::default();
        self.staged.views.insert(*id, None);
        self.staged.task_keys.insert(*id, None);
    }

    /// The stream's state to evolve (copied from the committed state on first touch).
    pub fn state<D: Decider>(&mut self, id: &Subject<D>) -> &mut D::State {
        let committed = self.committed;
        self.staged.of::<D>().entry(id.clone()).or_insert_with(|| committed.and_then(|c| c.get::<D>()).and_then(|m| m.get(id)).cloned().unwrap_or_default())
    }
}
