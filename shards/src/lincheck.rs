//! A linearizability checker for recorded client histories: the
//! Wing–Gong algorithm with Lowe's memoisation (as in Porcupine and
//! Knossos), run per key, since linearizability is compositional.
//!
//! A history is each call's operation, when it was invoked, and when it
//! returned with what, or that its outcome is unknown (a timeout, a
//! dropped connection): such a call may have taken effect at any moment
//! after its invocation, or never, so it is treated as returning at the
//! end of time with any result. The checker searches for an order of the
//! calls that respects real time (a call that returned before another was
//! invoked comes first) and that the sequential model accepts, result by
//! result.
//!
//! Test tooling, kept in the library so that the replication simulation
//! and the black-box cluster tests share it.

use std::collections::HashSet;
use std::hash::Hash;

/// The sequential specification: the state of one key.
pub trait Model: Clone + Eq + Hash {
    type Op;
    type Ret: PartialEq + std::fmt::Debug;
    /// The state after `op`, and what `op` returns.
    fn step(&self, op: &Self::Op) -> (Self, Self::Ret);
    /// Whether `op` never changes the state. Such a call with an unknown
    /// outcome constrains nothing, and the checker leaves it out: it could
    /// go anywhere, so each one would double the orders to search.
    fn is_read(_op: &Self::Op) -> bool {
        false
    }
}

/// Most (set of placed calls, state) pairs the search remembers before it
/// gives up: a bound on memory, reported as inconclusive rather than as a
/// verdict.
pub const MAX_STATES: usize = 2_000_000;

/// One call of a history.
#[derive(Debug, Clone)]
pub struct Call<Op, Ret> {
    pub op: Op,
    /// Any monotonic clock, the same for every client.
    pub invoked: u64,
    /// When and with what it returned; `None` when the outcome is unknown.
    pub returned: Option<(u64, Ret)>,
}

/// Whether some order of `history` is legal for the model started at
/// `init`; `Err` names the calls that could not be placed.
pub fn check<M: Model>(init: &M, history: &[Call<M::Op, M::Ret>]) -> Result<(), String>
where
    M::Op: Clone,
    M::Ret: Clone,
{
    let history: Vec<Call<M::Op, M::Ret>> = history
        .iter()
        .filter(|c| c.returned.is_some() || !M::is_read(&c.op))
        .cloned()
        .collect();
    let history = &history[..];
    assert!(history.len() < (1 << 20), "history too long to search");
    let events = events(history);
    let mut list = Linked::new(&events);
    let mut linearized = Bits::new(history.len());
    let mut seen: HashSet<(Bits, M)> = HashSet::new();
    // (call placed, state before it)
    let mut stack: Vec<(usize, M)> = Vec::new();
    let mut state = init.clone();
    let mut at = list.head();
    while let Some(e) = at {
        let (call, is_return) = events[e];
        if !is_return {
            let (next, ret) = state.step(&history[call].op);
            let fits = history[call]
                .returned
                .as_ref()
                .is_none_or(|(_, want)| *want == ret);
            if fits {
                let mut placed = linearized.clone();
                placed.set(call);
                if seen.len() >= MAX_STATES {
                    return Err(format!(
                        "inconclusive: more than {MAX_STATES} states searched ({} calls)",
                        history.len()
                    ));
                }
                if seen.insert((placed.clone(), next.clone())) {
                    stack.push((call, state));
                    state = next;
                    linearized = placed;
                    list.lift(call);
                    at = list.head();
                    continue;
                }
            }
            at = list.next(e);
        } else {
            // A call returned before any order could place it: undo the
            // last placement and try the next candidate after it.
            let Some((call, before)) = stack.pop() else {
                return Err(format!(
                    "not linearizable: no order places call {call} ({:?}) before it returned",
                    history[call].returned.as_ref().map(|(_, r)| r)
                ));
            };
            state = before;
            linearized.clear(call);
            list.unlift(call);
            at = list.next(list.call_event(call));
        }
    }
    Ok(())
}

/// Each call's invocation and return as (call, is_return), in time order;
/// at equal times invocations first (overlap is the lenient reading).
/// Unknown outcomes return after everything.
fn events<Op, Ret>(history: &[Call<Op, Ret>]) -> Vec<(usize, bool)> {
    let mut timed: Vec<(u64, bool, usize)> = Vec::with_capacity(history.len() * 2);
    for (i, c) in history.iter().enumerate() {
        assert!(
            c.returned.as_ref().is_none_or(|(t, _)| *t >= c.invoked),
            "call {i} returned before it was invoked"
        );
        timed.push((c.invoked, false, i));
        timed.push((c.returned.as_ref().map_or(u64::MAX, |(t, _)| *t), true, i));
    }
    timed.sort();
    timed.into_iter().map(|(_, r, i)| (i, r)).collect()
}

/// The events as a doubly linked list from which a call's two events can
/// be lifted out and put back.
struct Linked {
    prev: Vec<Option<usize>>,
    next: Vec<Option<usize>>,
    head: Option<usize>,
    /// Per call: its invocation's and return's event.
    of_call: Vec<(usize, usize)>,
}

impl Linked {
    fn new(events: &[(usize, bool)]) -> Linked {
        let n = events.len();
        let mut of_call = vec![(0, 0); n / 2];
        for (e, &(call, is_return)) in events.iter().enumerate() {
            if is_return {
                of_call[call].1 = e;
            } else {
                of_call[call].0 = e;
            }
        }
        Linked {
            prev: (0..n).map(|e| e.checked_sub(1)).collect(),
            next: (0..n).map(|e| (e + 1 < n).then_some(e + 1)).collect(),
            head: (n > 0).then_some(0),
            of_call,
        }
    }

    fn head(&self) -> Option<usize> {
        self.head
    }

    fn next(&self, e: usize) -> Option<usize> {
        self.next[e]
    }

    fn call_event(&self, call: usize) -> usize {
        self.of_call[call].0
    }

    fn unlink(&mut self, e: usize) {
        match self.prev[e] {
            Some(p) => self.next[p] = self.next[e],
            None => self.head = self.next[e],
        }
        if let Some(n) = self.next[e] {
            self.prev[n] = self.prev[e];
        }
    }

    fn relink(&mut self, e: usize) {
        match self.prev[e] {
            Some(p) => self.next[p] = Some(e),
            None => self.head = Some(e),
        }
        if let Some(n) = self.next[e] {
            self.prev[n] = Some(e);
        }
    }

    /// Takes a call's two events out (return first kept consistent).
    fn lift(&mut self, call: usize) {
        let (inv, ret) = self.of_call[call];
        self.unlink(inv);
        self.unlink(ret);
    }

    /// Puts them back, in the reverse order of `lift`.
    fn unlift(&mut self, call: usize) {
        let (inv, ret) = self.of_call[call];
        self.relink(ret);
        self.relink(inv);
    }
}

/// A set of call numbers.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// rstmdb's instance, as a sequential model: absent or in a state, moved
/// by events along a transition table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceModel {
    /// `None` until created (and after deletion).
    pub state: Option<String>,
    /// `(from, event, to)`.
    pub transitions: std::rc::Rc<Vec<(String, String, String)>>,
}

/// A call on one instance.
#[derive(Debug, Clone)]
pub enum InstanceOp {
    Create { initial: String },
    Apply { event: String },
    Get,
}

/// What a call on one instance answered: the state after it, or the
/// error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceRet {
    State(String),
    Error(String),
}

impl Model for InstanceModel {
    type Op = InstanceOp;
    type Ret = InstanceRet;

    fn is_read(op: &InstanceOp) -> bool {
        matches!(op, InstanceOp::Get)
    }

    fn step(&self, op: &InstanceOp) -> (Self, InstanceRet) {
        let err = |code: &str| (self.clone(), InstanceRet::Error(code.into()));
        match (op, &self.state) {
            (InstanceOp::Create { .. }, Some(_)) => err("INSTANCE_EXISTS"),
            (InstanceOp::Create { initial }, None) => {
                let next = InstanceModel {
                    state: Some(initial.clone()),
                    transitions: self.transitions.clone(),
                };
                (next, InstanceRet::State(initial.clone()))
            }
            (_, None) => err("INSTANCE_NOT_FOUND"),
            (InstanceOp::Get, Some(s)) => (self.clone(), InstanceRet::State(s.clone())),
            (InstanceOp::Apply { event }, Some(s)) => {
                let to = self
                    .transitions
                    .iter()
                    .find(|(from, ev, _)| from == s && ev == event)
                    .map(|(_, _, to)| to.clone());
                match to {
                    None => err("INVALID_TRANSITION"),
                    Some(to) => {
                        let next = InstanceModel {
                            state: Some(to.clone()),
                            transitions: self.transitions.clone(),
                        };
                        (next, InstanceRet::State(to))
                    }
                }
            }
        }
    }
}
