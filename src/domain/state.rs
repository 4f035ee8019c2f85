//! The state machines of a split payment and of a split allocation.
//!
//! Each is a closed enum of states, a closed enum of the events that move it, and one `apply` function. `apply`
//! answers one of three ways:
//! - `Ok(Transition::To(next))`: the event moves the state forward;
//! - `Ok(Transition::Unchanged)`: the event is a repeat or arrived late (Stripe reorders and duplicates
//!   webhooks): harmless, nothing to write, nothing to emit;
//! - `Err(ForbiddenTransition)`: the event contradicts the state (e.g. `failed` after `succeeded`). It is an
//!   error to be logged and counted, never applied.
//!
//! Who moves each state on is said on the state.

use super::string_enum;

/// A transition's outcome when it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition<S> {
    To(S),
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("forbidden transition: {machine} in state {from} cannot take event {event}")]
pub struct ForbiddenTransition {
    pub machine: &'static str,
    pub from: &'static str,
    pub event: &'static str,
}

string_enum!(
    /// Where a split payment (one PaymentIntent) stands.
    PaymentStatus {
        /// Rows written at intake; the PaymentIntent is being created. Moved on by intake.
        Created => "CREATED",
        /// The PaymentIntent exists and waits for the donor to confirm. Moved on by Stripe's webhooks.
        RequiresPayment => "REQUIRES_PAYMENT",
        /// A bank debit (BECS, PayTo) is in flight for days. Moved on by webhooks or the reconcile-pending cron.
        Processing => "PROCESSING",
        /// The money is on the platform's balance; distribution runs per allocation. Final.
        Succeeded => "SUCCEEDED",
        /// Declined or dishonoured; nothing is transferred. Final.
        Failed => "FAILED",
        /// The PaymentIntent was canceled before it was paid. Final.
        Canceled => "CANCELED",
    }
);

string_enum!(
    /// What happened to a split payment's PaymentIntent.
    PaymentEvent {
        /// The PaymentIntent was created and awaits confirmation.
        IntentCreated => "intent_created",
        /// `payment_intent.processing`.
        Processing => "processing",
        /// `payment_intent.succeeded`.
        Succeeded => "succeeded",
        /// `payment_intent.payment_failed` when a donor can still try again on the same PaymentIntent (confirmed in
        /// the browser): Stripe returns it to `requires_payment_method`.
        AttemptFailed => "attempt_failed",
        /// Nobody can pay any more: a server-side confirmation failed (splitpay cancels the PaymentIntent), Stripe
        /// refused to create the PaymentIntent, or intake was abandoned.
        Failed => "failed",
        /// `payment_intent.canceled` (abandoned after `abandon_after`, or canceled at Stripe).
        Canceled => "canceled",
    }
);

impl PaymentStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PaymentStatus::Succeeded | PaymentStatus::Failed | PaymentStatus::Canceled
        )
    }

    pub fn apply(self, event: PaymentEvent) -> Result<Transition<PaymentStatus>, ForbiddenTransition> {
        use PaymentEvent as E;
        use PaymentStatus as S;
        let next = match (self, event) {
            (S::Created, E::IntentCreated) => S::RequiresPayment,
            (S::Created | S::RequiresPayment, E::Processing) => S::Processing,
            (S::Created | S::RequiresPayment | S::Processing, E::Succeeded) => S::Succeeded,
            // A failed attempt (a decline, a dishonoured debit) leaves the PaymentIntent payable again. From
            // REQUIRES_PAYMENT it is a self-loop: the attempt is recorded and announced, the state stays.
            (S::Created | S::RequiresPayment | S::Processing, E::AttemptFailed) => S::RequiresPayment,
            (S::Created | S::RequiresPayment | S::Processing, E::Failed) => S::Failed,
            (S::Created | S::RequiresPayment, E::Canceled) => S::Canceled,

            // Repeats and late arrivals: webhooks come out of order and more than once. A failed attempt reported
            // after the payment ended (the donor's next card succeeded) changes nothing; nor does the
            // cancellation splitpay itself makes after a final failure, or a failure reported after a cancel.
            (S::RequiresPayment, E::IntentCreated)
            | (S::Processing, E::IntentCreated | E::Processing)
            | (S::Succeeded, E::IntentCreated | E::Processing | E::Succeeded | E::AttemptFailed)
            | (S::Failed, E::IntentCreated | E::Processing | E::AttemptFailed | E::Failed | E::Canceled)
            | (S::Canceled, E::IntentCreated | E::AttemptFailed | E::Failed | E::Canceled) => {
                return Ok(Transition::Unchanged)
            }

            // Contradictions: a final state met by a different final outcome, or a debit in flight canceled.
            (S::Processing, E::Canceled)
            | (S::Succeeded, E::Failed | E::Canceled)
            | (S::Failed, E::Succeeded)
            | (S::Canceled, E::Processing | E::Succeeded) => {
                return Err(ForbiddenTransition {
                    machine: "split_payment",
                    from: self.as_str(),
                    event: event.as_str(),
                })
            }
        };
        Ok(Transition::To(next))
    }
}

string_enum!(
    /// Where one recipient's share stands.
    AllocationStatus {
        /// Waiting for the payment to succeed. Moved on by the payment's outcome, or by distribution.
        Pending => "PENDING",
        /// A transfer generation is written (generation, idempotency key, frozen parameters) and being made or
        /// retried with the same key. Moved on by the transfer job or the reconcilers; only Stripe's answer (a
        /// transfer, or a terminal refusal, or a lookup that proved there is none) moves it on.
        Transferring => "TRANSFERRING",
        /// The Stripe Transfer exists. Final (a later reversal is a separate record), but for a new generation
        /// that gives the recipient back money a reversal took: a won dispute, or what a reversal made for a refund
        /// that no longer stands held beyond what a later refund used of it.
        Transferred => "TRANSFERRED",
        /// Stripe refused the transfer terminally, the retry window ended with proof that no transfer exists, or
        /// the fees left nothing to transfer. The money sits on the platform balance for an operator (`ops retry`
        /// with a new generation, or `ops refund`). Stripe's word still wins: a transfer found later moves it to
        /// TRANSFERRED.
        Parked => "PARKED",
        /// This share was refunded to the donor (its net, or what was left of it to transfer). Final: a later
        /// refund attributed to it is the platform's loss.
        Refunded => "REFUNDED",
        /// The payment failed or was canceled; there is nothing to distribute. Final.
        Voided => "VOIDED",
    }
);

string_enum!(
    /// What happens to a split allocation.
    AllocationEvent {
        /// The intent to transfer is written (a new generation with its key and parameters).
        TransferStarted => "transfer_started",
        /// Stripe shows a transfer of the allocation's generation: a create's answer (first or replayed), a
        /// lookup, or a reconcile. Stripe's word wins, from TRANSFERRING and from PARKED.
        TransferSucceeded => "transfer_succeeded",
        /// A terminal Stripe refusal, or the retry window ended and a lookup proved no transfer exists.
        TransferFailed => "transfer_failed",
        /// An operator retries a parked allocation (a new generation, hence a new idempotency key).
        OpsRetry => "ops_retry",
        /// A parked allocation's net is fully refunded to the donor (`ops refund`, or a refund made at Stripe).
        Refunded => "refunded",
        /// Refunds took the whole share before its transfer started: nothing is left to transfer.
        RefundedBeforeTransfer => "refunded_before_transfer",
        /// The fee split left nothing to transfer: parked `net_amount_zero`, for an operator to refund.
        NothingToTransfer => "nothing_to_transfer",
        /// The payment failed or was canceled.
        PaymentVoided => "payment_voided",
        /// A won dispute gave back funds whose withdrawal took this share (reversed, or refunded before its
        /// transfer): what the recipient is owed again is sent as a new generation (a new key).
        DisputeReinstated => "dispute_reinstated",
        /// A reversal made for a refund that no longer stands (Stripe failed it, a dispute closed the `ops refund`
        /// intent) was taken by a later refund of the share, which used less of it than it holds (a smaller part,
        /// or the `none` policy): the rest is the recipient's, sent back as a new generation (a new key).
        ExcessReversalReturned => "excess_reversal_returned",
    }
);

impl AllocationEvent {
    /// The events that move a settled share to a new generation, giving the recipient back money a reversal took.
    pub fn gives_back(self) -> bool {
        matches!(
            self,
            AllocationEvent::DisputeReinstated | AllocationEvent::ExcessReversalReturned
        )
    }
}

impl AllocationStatus {
    /// Settled: nothing moves it on except a new generation that gives back what a reversal took
    /// ([`AllocationEvent::gives_back`]).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AllocationStatus::Transferred | AllocationStatus::Refunded | AllocationStatus::Voided
        )
    }

    pub fn apply(self, event: AllocationEvent) -> Result<Transition<AllocationStatus>, ForbiddenTransition> {
        use AllocationEvent as E;
        use AllocationStatus as S;
        let next = match (self, event) {
            (S::Pending, E::TransferStarted) => S::Transferring,
            (S::Pending, E::NothingToTransfer) => S::Parked,
            (S::Pending, E::PaymentVoided) => S::Voided,
            (S::Pending, E::RefundedBeforeTransfer) => S::Refunded,
            // Stripe's word wins: a transfer Stripe shows ends the allocation TRANSFERRED, parked or not.
            (S::Transferring | S::Parked, E::TransferSucceeded) => S::Transferred,
            (S::Transferring, E::TransferFailed) => S::Parked,
            (S::Parked, E::OpsRetry) => S::Transferring,
            (S::Parked, E::Refunded) => S::Refunded,
            (S::Transferred | S::Refunded, E::DisputeReinstated) => S::Transferring,
            // Only a transferred share's reversal can be left over: a refunded one has no transfer to reverse.
            (S::Transferred, E::ExcessReversalReturned) => S::Transferring,

            // Repeats: a duplicate job, a second replica, a replayed Stripe response.
            (S::Transferring, E::TransferStarted)
            | (S::Transferred, E::TransferStarted | E::TransferSucceeded)
            | (S::Parked, E::TransferFailed | E::NothingToTransfer)
            | (S::Refunded, E::Refunded | E::RefundedBeforeTransfer)
            | (S::Voided, E::PaymentVoided) => return Ok(Transition::Unchanged),

            _ => {
                return Err(ForbiddenTransition {
                    machine: "split_allocation",
                    from: self.as_str(),
                    event: event.as_str(),
                })
            }
        };
        Ok(Transition::To(next))
    }
}

string_enum!(
    /// A recipient's donation row (seed `Donation.status`).
    DonationStatus {
        /// Written; funds have not settled (card in flight, BECS/PayTo in the bank network, transfer not made).
        Pending => "PENDING",
        /// The transfer to the recipient was made.
        Confirmed => "CONFIRMED",
        /// Fully refunded to the donor. Final.
        Refunded => "REFUNDED",
        /// The donor's payment failed. Final.
        Failed => "FAILED",
    }
);

string_enum!(
    /// What happens to a donation row.
    DonationEvent {
        Confirmed => "confirmed",
        Failed => "failed",
        /// Fully refunded (a partial refund changes `refunded_amount_cents`, not the status).
        Refunded => "refunded",
        /// A won dispute gave back what its withdrawal refunded and the share is sent anew (or not settled): a fully
        /// refunded donation is PENDING again until its share is transferred (a partial one keeps its status; only
        /// the amount changes).
        RefundReversed => "refund_reversed",
        /// A won dispute gave back what its withdrawal refunded, and the recipient still holds the share (its
        /// reversal was never made, or the platform bore the refund): a fully refunded donation is CONFIRMED again.
        RefundReversedHeld => "refund_reversed_held",
    }
);

impl DonationStatus {
    pub fn apply(self, event: DonationEvent) -> Result<Transition<DonationStatus>, ForbiddenTransition> {
        use DonationEvent as E;
        use DonationStatus as S;
        let next = match (self, event) {
            (S::Pending, E::Confirmed) => S::Confirmed,
            (S::Pending, E::Failed) => S::Failed,
            // A parked share refunded to the donor was never confirmed to the recipient.
            (S::Pending | S::Confirmed, E::Refunded) => S::Refunded,
            (S::Refunded, E::RefundReversed) => S::Pending,
            (S::Refunded, E::RefundReversedHeld) => S::Confirmed,
            (S::Pending | S::Confirmed, E::RefundReversed | E::RefundReversedHeld) => return Ok(Transition::Unchanged),
            (S::Confirmed, E::Confirmed) | (S::Failed, E::Failed) | (S::Refunded, E::Refunded) => {
                return Ok(Transition::Unchanged)
            }
            _ => {
                return Err(ForbiddenTransition {
                    machine: "donation",
                    from: self.as_str(),
                    event: event.as_str(),
                })
            }
        };
        Ok(Transition::To(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use AllocationEvent as AE;
    use AllocationStatus as AS;
    use PaymentEvent as PE;
    use PaymentStatus as PS;

    /// `T(x)`: moves to x; `U`: unchanged (repeat / late); `F`: forbidden.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want<S> {
        T(S),
        U,
        F,
    }
    use Want::{F, T, U};

    fn check<S, E>(
        table: &[(S, E, Want<S>)],
        states: &[S],
        events: &[E],
        apply: impl Fn(S, E) -> Result<Transition<S>, ForbiddenTransition>,
    ) where
        S: Copy + Eq + std::hash::Hash + std::fmt::Debug,
        E: Copy + Eq + std::hash::Hash + std::fmt::Debug,
    {
        let expected: HashMap<(S, E), Want<S>> = table.iter().map(|&(s, e, w)| ((s, e), w)).collect();
        assert_eq!(expected.len(), table.len(), "table lists a pair twice");
        assert_eq!(
            table.len(),
            states.len() * events.len(),
            "table must list every (state, event) pair"
        );
        for &s in states {
            for &e in events {
                let got = match apply(s, e) {
                    Ok(Transition::To(n)) => T(n),
                    Ok(Transition::Unchanged) => U,
                    Err(_) => F,
                };
                assert_eq!(got, expected[&(s, e)], "{s:?} + {e:?}");
            }
        }
    }

    #[test]
    fn payment_transitions_every_pair() {
        #[rustfmt::skip]
        let table = [
            (PS::Created, PE::IntentCreated, T(PS::RequiresPayment)),
            (PS::Created, PE::Processing, T(PS::Processing)),
            (PS::Created, PE::Succeeded, T(PS::Succeeded)),
            (PS::Created, PE::AttemptFailed, T(PS::RequiresPayment)),
            (PS::Created, PE::Failed, T(PS::Failed)),
            (PS::Created, PE::Canceled, T(PS::Canceled)),
            (PS::RequiresPayment, PE::IntentCreated, U),
            (PS::RequiresPayment, PE::Processing, T(PS::Processing)),
            (PS::RequiresPayment, PE::Succeeded, T(PS::Succeeded)),
            (PS::RequiresPayment, PE::AttemptFailed, T(PS::RequiresPayment)),
            (PS::RequiresPayment, PE::Failed, T(PS::Failed)),
            (PS::RequiresPayment, PE::Canceled, T(PS::Canceled)),
            (PS::Processing, PE::IntentCreated, U),
            (PS::Processing, PE::Processing, U),
            (PS::Processing, PE::Succeeded, T(PS::Succeeded)),
            (PS::Processing, PE::AttemptFailed, T(PS::RequiresPayment)),
            (PS::Processing, PE::Failed, T(PS::Failed)),
            (PS::Processing, PE::Canceled, F),
            (PS::Succeeded, PE::IntentCreated, U),
            (PS::Succeeded, PE::Processing, U),
            (PS::Succeeded, PE::Succeeded, U),
            (PS::Succeeded, PE::AttemptFailed, U),
            (PS::Succeeded, PE::Failed, F),
            (PS::Succeeded, PE::Canceled, F),
            (PS::Failed, PE::IntentCreated, U),
            (PS::Failed, PE::Processing, U),
            (PS::Failed, PE::Succeeded, F),
            (PS::Failed, PE::AttemptFailed, U),
            (PS::Failed, PE::Failed, U),
            (PS::Failed, PE::Canceled, U),
            (PS::Canceled, PE::IntentCreated, U),
            (PS::Canceled, PE::Processing, F),
            (PS::Canceled, PE::Succeeded, F),
            (PS::Canceled, PE::AttemptFailed, U),
            (PS::Canceled, PE::Failed, U),
            (PS::Canceled, PE::Canceled, U),
        ];
        check(&table, PS::ALL, PE::ALL, PS::apply);
    }

    #[test]
    fn a_declined_attempt_can_still_be_paid() {
        // Decline, decline again, then success on the same PaymentIntent: distributed.
        let mut s = PS::Created;
        for e in [PE::IntentCreated, PE::AttemptFailed, PE::AttemptFailed, PE::Succeeded] {
            if let Ok(Transition::To(n)) = s.apply(e) {
                s = n;
            }
        }
        assert_eq!(s, PS::Succeeded);
        // A dishonoured debit in flight goes back to waiting for payment, not to FAILED.
        assert_eq!(
            PS::Processing.apply(PE::AttemptFailed),
            Ok(Transition::To(PS::RequiresPayment))
        );
    }

    #[test]
    fn allocation_transitions_every_pair() {
        let moves = [
            (AS::Pending, AE::TransferStarted, T(AS::Transferring)),
            (AS::Pending, AE::NothingToTransfer, T(AS::Parked)),
            (AS::Pending, AE::PaymentVoided, T(AS::Voided)),
            (AS::Pending, AE::RefundedBeforeTransfer, T(AS::Refunded)),
            (AS::Transferring, AE::TransferSucceeded, T(AS::Transferred)),
            (AS::Parked, AE::TransferSucceeded, T(AS::Transferred)),
            (AS::Transferring, AE::TransferFailed, T(AS::Parked)),
            (AS::Parked, AE::OpsRetry, T(AS::Transferring)),
            (AS::Parked, AE::Refunded, T(AS::Refunded)),
            (AS::Transferred, AE::DisputeReinstated, T(AS::Transferring)),
            (AS::Refunded, AE::DisputeReinstated, T(AS::Transferring)),
            (AS::Transferred, AE::ExcessReversalReturned, T(AS::Transferring)),
            (AS::Transferring, AE::TransferStarted, U),
            (AS::Transferred, AE::TransferStarted, U),
            (AS::Transferred, AE::TransferSucceeded, U),
            (AS::Parked, AE::TransferFailed, U),
            (AS::Parked, AE::NothingToTransfer, U),
            (AS::Refunded, AE::Refunded, U),
            (AS::Refunded, AE::RefundedBeforeTransfer, U),
            (AS::Voided, AE::PaymentVoided, U),
        ];
        // Every other pair is forbidden: spell the table out in full so a change to `apply` must change it.
        let mut table = Vec::new();
        for &s in AS::ALL {
            for &e in AE::ALL {
                let want = moves.iter().find(|m| m.0 == s && m.1 == e).map_or(F, |m| m.2);
                table.push((s, e, want));
            }
        }
        assert_eq!(
            table.iter().filter(|t| t.2 == F).count(),
            AS::ALL.len() * AE::ALL.len() - moves.len()
        );
        check(&table, AS::ALL, AE::ALL, AS::apply);
        // A few forbidden pairs that matter most, stated positively:
        assert!(
            AS::Transferred.apply(AE::TransferFailed).is_err(),
            "a made transfer is never parked"
        );
        assert!(
            AS::Transferred.apply(AE::OpsRetry).is_err(),
            "a made transfer is never retried"
        );
        assert!(
            AS::Pending.apply(AE::TransferSucceeded).is_err(),
            "no success without a written intent"
        );
        assert!(
            AS::Refunded.apply(AE::OpsRetry).is_err(),
            "a refunded share cannot be transferred"
        );
        assert!(
            AS::Transferring.apply(AE::ExcessReversalReturned).is_err(),
            "an excess is given back only by a settled transfer's new generation"
        );
    }

    #[test]
    fn donation_transitions_every_pair() {
        use DonationEvent as DE;
        use DonationStatus as DS;
        #[rustfmt::skip]
        let table = [
            (DS::Pending, DE::Confirmed, T(DS::Confirmed)),
            (DS::Pending, DE::Failed, T(DS::Failed)),
            (DS::Pending, DE::Refunded, T(DS::Refunded)),
            (DS::Confirmed, DE::Confirmed, U),
            (DS::Confirmed, DE::Failed, F),
            (DS::Confirmed, DE::Refunded, T(DS::Refunded)),
            (DS::Refunded, DE::Confirmed, F),
            (DS::Refunded, DE::Failed, F),
            (DS::Refunded, DE::Refunded, U),
            (DS::Failed, DE::Confirmed, F),
            (DS::Failed, DE::Failed, U),
            (DS::Failed, DE::Refunded, F),
            (DS::Refunded, DE::RefundReversed, T(DS::Pending)),
            (DS::Pending, DE::RefundReversed, U),
            (DS::Confirmed, DE::RefundReversed, U),
            (DS::Failed, DE::RefundReversed, F),
            (DS::Refunded, DE::RefundReversedHeld, T(DS::Confirmed)),
            (DS::Pending, DE::RefundReversedHeld, U),
            (DS::Confirmed, DE::RefundReversedHeld, U),
            (DS::Failed, DE::RefundReversedHeld, F),
        ];
        check(&table, DS::ALL, DE::ALL, DS::apply);
    }

    #[test]
    fn final_states_only_repeat_or_refuse() {
        for &s in PS::ALL.iter().filter(|s| s.is_final()) {
            for &e in PE::ALL {
                assert!(!matches!(s.apply(e), Ok(Transition::To(_))), "{s} + {e}");
            }
        }
        // The only ways out of a final allocation: a new generation giving back what a reversal took (a won
        // dispute, or an excess reversal).
        for &s in AS::ALL.iter().filter(|s| s.is_final()) {
            for &e in AE::ALL.iter().filter(|&&e| !e.gives_back()) {
                assert!(!matches!(s.apply(e), Ok(Transition::To(_))), "{s} + {e}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for &s in PS::ALL {
            assert_eq!(PS::parse(s.as_str()), Some(s));
        }
        for &s in AS::ALL {
            assert_eq!(AS::parse(s.as_str()), Some(s));
        }
        assert_eq!(PS::parse("succeeded"), None, "statuses are upper case, exactly");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn allocation_event() -> impl Strategy<Value = AE> {
            proptest::sample::select(AE::ALL.to_vec())
        }

        fn run(start: AS, events: &[AE]) -> AS {
            events.iter().fold(start, |s, &e| match s.apply(e) {
                Ok(Transition::To(n)) => n,
                _ => s,
            })
        }

        proptest! {
            /// Stripe's word wins: whatever happened before, once Stripe shows a transfer of an allocation that
            /// was being transferred or was parked, it is TRANSFERRED, and nothing but a new generation giving
            /// back what a reversal took moves it from there.
            #[test]
            fn a_transfer_stripe_shows_is_never_left_behind(
                before in proptest::collection::vec(allocation_event(), 0..12),
                after in proptest::collection::vec(allocation_event(), 0..12),
            ) {
                let s = run(AS::Pending, &before);
                if matches!(s, AS::Transferring | AS::Parked) {
                    let paid = run(s, &[AE::TransferSucceeded]);
                    prop_assert_eq!(paid, AS::Transferred);
                    let after: Vec<AE> = after.into_iter().filter(|&e| !e.gives_back()).collect();
                    prop_assert_eq!(run(paid, &after), AS::Transferred);
                }
            }

            /// No sequence of events reaches TRANSFERRED without a transfer Stripe showed, and only a new
            /// generation giving back what a reversal took moves a TRANSFERRED allocation (a made transfer is never
            /// parked, retried or refunded as parked).
            #[test]
            fn transferred_only_from_stripe_and_absorbing(events in proptest::collection::vec(allocation_event(), 0..24)) {
                let mut s = AS::Pending;
                for &e in &events {
                    let next = match s.apply(e) {
                        Ok(Transition::To(n)) => n,
                        _ => s,
                    };
                    if next == AS::Transferred && s != AS::Transferred {
                        prop_assert_eq!(e, AE::TransferSucceeded);
                    }
                    if s == AS::Transferred && !e.gives_back() {
                        prop_assert_eq!(next, AS::Transferred);
                    }
                    if s == AS::Transferred && next != s {
                        prop_assert_eq!(next, AS::Transferring, "a new generation, with its own key");
                    }
                    s = next;
                }
            }

            /// Only a refund reaches REFUNDED, and only from PENDING (nothing transferred yet) or PARKED: a share
            /// being transferred or transferred is never marked refunded (its refund waits, or is a reversal).
            #[test]
            fn refunded_only_by_a_refund_before_any_transfer(events in proptest::collection::vec(allocation_event(), 0..24)) {
                let mut s = AS::Pending;
                for &e in &events {
                    let next = match s.apply(e) {
                        Ok(Transition::To(n)) => n,
                        _ => s,
                    };
                    if next == AS::Refunded && s != AS::Refunded {
                        prop_assert!(matches!((s, e), (AS::Pending, AE::RefundedBeforeTransfer) | (AS::Parked, AE::Refunded)));
                    }
                    s = next;
                }
            }

            /// A parked allocation can always still be paid (by Stripe's word), retried or refunded: PARKED is
            /// never a dead end.
            #[test]
            fn parked_always_has_a_way_out(before in proptest::collection::vec(allocation_event(), 0..12)) {
                if run(AS::Pending, &before) == AS::Parked {
                    prop_assert_eq!(AS::Parked.apply(AE::TransferSucceeded), Ok(Transition::To(AS::Transferred)));
                    prop_assert_eq!(AS::Parked.apply(AE::OpsRetry), Ok(Transition::To(AS::Transferring)));
                    prop_assert_eq!(AS::Parked.apply(AE::Refunded), Ok(Transition::To(AS::Refunded)));
                }
            }

            /// A payment that succeeded never ends otherwise, whatever arrives after (late failures, cancels).
            #[test]
            fn a_succeeded_payment_stays_succeeded(events in proptest::collection::vec(proptest::sample::select(PE::ALL.to_vec()), 0..16)) {
                let end = events.iter().fold(PS::Succeeded, |s, &e| match s.apply(e) {
                    Ok(Transition::To(n)) => n,
                    _ => s,
                });
                prop_assert_eq!(end, PS::Succeeded);
            }
        }
    }
}
