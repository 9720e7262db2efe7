//! The test helpers, as users write tests with them: given past events, when a command runs,
//! then these events or this error; and a projection given events.

mod conformance;

use annals::prelude::*;
use annals::subscription::{Envelope, On};
use annals::testing::{given, project};
use annals::{BoxError, Transaction};
use conformance::domain::*;
use conformance::evolution::{Funded, Spent, Wallet};

fn opened() -> Opened {
    Opened {
        owner: "Ann".into(),
    }
}

#[test]
fn a_command_records_its_events() {
    let then = given::<Account>()
        .event(opened())
        .events([Deposited { amount: 10 }, Deposited { amount: 5 }])
        .when(|account| account.withdraw(3))
        .then(Withdrawn { amount: 3 })
        .state(|account| assert_eq!((account.owner.as_str(), account.balance), ("Ann", 12)));
    assert_eq!(then.version(), 4);
}

#[test]
fn a_command_that_refuses_gives_its_error() {
    given::<Account>()
        .event(Deposited { amount: 1 })
        .when(|account| account.withdraw(3))
        .then_error(BankError::Overdrawn {
            balance: 1,
            wanted: 3,
        });
    given::<Account>()
        .when(|account| account.withdraw(1))
        .then_error_matches(|e| matches!(e, BankError::Overdrawn { balance: 0, .. }));
}

#[test]
fn commands_may_record_nothing_or_several_events() {
    given::<Account>()
        .when(|_| Ok::<_, BankError>(()))
        .then(())
        .state(|account| assert_eq!(account.balance, 0));
    given::<Account>()
        .when(|_| Ok::<_, BankError>((opened(), Deposited { amount: 2 })))
        .then((opened(), Deposited { amount: 2 }))
        .state(|account| assert_eq!(account.balance, 2));
    given::<Counter>()
        .event(CounterEvent::Added { by: 4 })
        .when(|_| Ok::<_, BankError>(vec![CounterEvent::Reset(0), CounterEvent::Incremented]))
        .then(vec![CounterEvent::Reset(0), CounterEvent::Incremented])
        .state(|c| assert_eq!(c.value, 1));
}

#[test]
fn the_state_is_what_a_load_rebuilds() {
    // Given events are applied through their stored form and the aggregate's dispatch, enum
    // variants included.
    let wallet = given::<Wallet>()
        .event(Funded {
            amount: 5,
            currency: "EUR".into(),
        })
        .event(Spent::Withdrawn { amount: 2 })
        .when(|_| Ok::<_, BankError>(Spent::Frozen))
        .then(Spent::Frozen)
        .into_state();
    assert_eq!((wallet.balance, wallet.frozen), (3, true));
}

#[test]
#[should_panic(expected = "the command returned other events")]
fn other_events_fail_the_test() {
    given::<Account>()
        .event(Deposited { amount: 10 })
        .when(|account| account.withdraw(3))
        .then(Withdrawn { amount: 4 });
}

#[test]
#[should_panic(expected = "but the command failed")]
fn an_error_where_events_were_expected_fails_the_test() {
    given::<Account>()
        .when(|account| account.withdraw(3))
        .then(Withdrawn { amount: 3 });
}

#[test]
#[should_panic(expected = "but the command returned")]
fn events_where_an_error_was_expected_fail_the_test() {
    given::<Account>()
        .event(Deposited { amount: 10 })
        .when(|account| account.withdraw(3))
        .then_error(BankError::Conflict);
}

#[test]
#[should_panic(expected = "the command failed otherwise")]
fn another_error_fails_the_test() {
    given::<Account>()
        .when(|account| account.withdraw(3))
        .then_error(BankError::Conflict);
}

/// Deposits per account, and each deposit's version.
#[derive(annals::Projection, Default, Debug)]
#[projection(name = "testing.deposits", events(Deposited))]
struct Deposits {
    seen: Vec<(AggregateId, i64, u64, String)>,
}

impl On<Deposited> for Deposits {
    async fn on(
        &mut self,
        e: Deposited,
        env: &Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if e.amount < 0 {
            return Err("a negative deposit".into());
        }
        self.seen.push((
            env.aggregate_id,
            e.amount,
            env.version,
            env.aggregate_type.clone(),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_given_events() {
    let (ann, bob) = (AggregateId::new(), AggregateId::new());
    let deposits = project(Deposits::default())
        .given(ann, opened())
        .given(ann, Deposited { amount: 5 })
        .given(bob, Deposited { amount: 2 })
        .given(ann, Withdrawn { amount: 1 })
        .given(ann, Deposited { amount: 7 })
        .run()
        .await
        .unwrap();
    let account = || "account".to_owned();
    assert_eq!(
        deposits.seen,
        [
            (ann, 5, 2, account()),
            (bob, 2, 1, account()),
            (ann, 7, 4, account())
        ]
    );
    let failed = project(Deposits::default())
        .given(ann, Deposited { amount: -1 })
        .run()
        .await;
    assert_eq!(failed.unwrap_err().to_string(), "a negative deposit");
}
