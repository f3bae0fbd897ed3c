//! The linearizability checker (`rstmdb_shards::lincheck`) on histories
//! whose verdict is known: it must accept the legal ones and reject the
//! illegal ones, or the cluster tests that rely on it prove nothing.

use std::rc::Rc;

use rstmdb_shards::lincheck::{check, Call, InstanceModel, InstanceOp, InstanceRet, Model};

/// A register: the simplest model, for the textbook cases.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Register(u64);

#[derive(Debug, Clone)]
enum RegOp {
    Write(u64),
    Read,
}

impl Model for Register {
    type Op = RegOp;
    type Ret = u64;
    fn step(&self, op: &RegOp) -> (Register, u64) {
        match op {
            RegOp::Write(v) => (Register(*v), *v),
            RegOp::Read => (self.clone(), self.0),
        }
    }
}

fn call<Op, Ret>(op: Op, invoked: u64, returned: u64, ret: Ret) -> Call<Op, Ret> {
    Call {
        op,
        invoked,
        returned: Some((returned, ret)),
    }
}

#[test]
fn sequential_and_overlapping_histories_pass() {
    let ok = [
        call(RegOp::Write(1), 0, 10, 1),
        call(RegOp::Read, 20, 30, 1),
        // Overlaps the write of 2: may read either value.
        call(RegOp::Write(2), 40, 60, 2),
        call(RegOp::Read, 45, 50, 1),
        call(RegOp::Read, 46, 55, 2),
    ];
    check(&Register(0), &ok).unwrap();
}

#[test]
fn a_stale_read_after_a_completed_write_fails() {
    let bad = [
        call(RegOp::Write(1), 0, 10, 1),
        call(RegOp::Write(2), 20, 30, 2),
        call(RegOp::Read, 40, 50, 1),
    ];
    assert!(check(&Register(0), &bad).is_err());
}

#[test]
fn reads_going_back_in_time_fail() {
    // Both reads overlap the write, but the second starts after the first
    // ended: having seen 2, it cannot see 0 again.
    let bad = [
        call(RegOp::Write(2), 0, 100, 2),
        call(RegOp::Read, 10, 20, 2),
        call(RegOp::Read, 30, 40, 0),
    ];
    assert!(check(&Register(0), &bad).is_err());
}

#[test]
fn an_unknown_outcome_may_or_may_not_have_happened() {
    let lost = Call {
        op: RegOp::Write(7),
        invoked: 0,
        returned: None,
    };
    let took_effect = [lost.clone(), call(RegOp::Read, 50, 60, 7)];
    check(&Register(0), &took_effect).unwrap();
    let did_not = [lost.clone(), call(RegOp::Read, 50, 60, 0)];
    check(&Register(0), &did_not).unwrap();
    // ... but not before it was invoked.
    let early = [
        call(RegOp::Read, 0, 5, 7),
        Call {
            invoked: 10,
            ..lost
        },
    ];
    assert!(check(&Register(0), &early).is_err());
}

fn machine() -> InstanceModel {
    let t = |a: &str, e: &str, b: &str| (a.to_string(), e.to_string(), b.to_string());
    InstanceModel {
        state: None,
        transitions: Rc::new(vec![
            t("created", "pay", "paid"),
            t("paid", "ship", "shipped"),
            t("created", "cancel", "cancelled"),
        ]),
    }
}

fn st(s: &str) -> InstanceRet {
    InstanceRet::State(s.into())
}

fn er(s: &str) -> InstanceRet {
    InstanceRet::Error(s.into())
}

#[test]
fn instance_histories_are_judged_by_the_transition_table() {
    let create = || InstanceOp::Create {
        initial: "created".into(),
    };
    let apply = |e: &str| InstanceOp::Apply { event: e.into() };
    // pay and cancel race: exactly one may win.
    let ok = [
        call(create(), 0, 10, st("created")),
        call(apply("pay"), 20, 40, st("paid")),
        call(apply("cancel"), 25, 35, er("INVALID_TRANSITION")),
        call(InstanceOp::Get, 50, 60, st("paid")),
    ];
    check(&machine(), &ok).unwrap();
    // Both succeeding is a lost update.
    let both = [
        call(create(), 0, 10, st("created")),
        call(apply("pay"), 20, 40, st("paid")),
        call(apply("cancel"), 25, 35, st("cancelled")),
    ];
    assert!(check(&machine(), &both).is_err());
    // An acknowledged transition that a later read does not see is lost.
    let lost = [
        call(create(), 0, 10, st("created")),
        call(apply("pay"), 20, 30, st("paid")),
        call(InstanceOp::Get, 40, 50, st("created")),
    ];
    assert!(check(&machine(), &lost).is_err());
    // Applying to an instance not yet created.
    let early = [
        call(apply("pay"), 0, 5, st("paid")),
        call(create(), 10, 20, st("created")),
    ];
    assert!(check(&machine(), &early).is_err());
}

/// Random legal histories: a sequential run whose calls are then given
/// overlapping intervals around their linearisation points must pass; the
/// same history with one read's answer changed to a value never written
/// must fail.
#[test]
fn random_legal_histories_pass_and_corrupted_ones_fail() {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..200 {
        let mut reg = Register(0);
        let mut history = Vec::new();
        for i in 0..24u64 {
            let op = if rand(2) == 0 {
                RegOp::Write(1 + rand(5))
            } else {
                RegOp::Read
            };
            let (next, ret) = reg.step(&op);
            reg = next;
            let point = i * 10 + 20;
            history.push(call(op, point - rand(15), point + rand(15), ret));
        }
        check(&Register(0), &history).unwrap();
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].op, RegOp::Read))
            .collect();
        if let Some(&r) = reads.first() {
            history[r].returned.as_mut().unwrap().1 = 99;
            assert!(check(&Register(0), &history).is_err());
        }
    }
}

/// Reads whose outcome is unknown constrain nothing and are left out, so
/// that many of them (a partition's worth of timed-out GETs) do not make
/// the search explode.
#[test]
fn unknown_reads_are_left_out() {
    let mut history = vec![call(
        InstanceOp::Create {
            initial: "created".into(),
        },
        0,
        10,
        st("created"),
    )];
    for i in 0..300 {
        history.push(Call {
            op: InstanceOp::Get,
            invoked: 20 + i,
            returned: None,
        });
    }
    history.push(call(
        InstanceOp::Apply {
            event: "pay".into(),
        },
        400,
        410,
        st("paid"),
    ));
    check(&machine(), &history).unwrap();
}
