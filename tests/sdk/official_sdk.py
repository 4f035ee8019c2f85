"""Drives the splitpay Stripe simulator through Stripe's official Python SDK (pinned in tests/official_sdk.rs).

Usage: official_sdk.py BASE_URL   (e.g. http://127.0.0.1:12111)
Exits 0 and prints "official SDK: N checks passed" when every response parses into the SDK's typed objects with
the expected values; raises otherwise.
"""
import json
import sys
import urllib.request

import stripe

base = sys.argv[1].rstrip("/")
client = stripe.StripeClient(
    "sk_test_official_sdk_check",
    base_addresses={"api": base},
    max_network_retries=0,
)
checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(what)
    checks += 1


account = client.v1.accounts.create(
    params={"type": "custom", "country": "AU", "capabilities": {"transfers": {"requested": True}}}
)
check(isinstance(account, stripe.Account) and account.capabilities.transfers == "active", "account")

pi = client.v1.payment_intents.create(
    params={
        "amount": 10000,
        "currency": "aud",
        "payment_method": "pm_card_visa",
        "confirm": True,
        "transfer_group": "spay_sdk",
        "metadata": {"split_payment_id": "spay_sdk"},
    },
    options={"idempotency_key": "sdk-pi-1"},
)
check(isinstance(pi, stripe.PaymentIntent) and pi.status == "succeeded", "payment intent")
check(pi.metadata["split_payment_id"] == "spay_sdk", "metadata")

expanded = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge.balance_transaction"]})
charge = expanded.latest_charge
check(isinstance(charge, stripe.Charge) and charge.status == "succeeded", "expanded charge")
bt = charge.balance_transaction
check(isinstance(bt, stripe.BalanceTransaction) and bt.fee == 205 and bt.net == 9795, "balance transaction")

transfer = client.v1.transfers.create(
    params={"amount": 6000, "currency": "aud", "destination": account.id, "source_transaction": charge.id,
            "transfer_group": "spay_sdk"},
    options={"idempotency_key": "sdk-tr-1"},
)
check(isinstance(transfer, stripe.Transfer) and transfer.amount == 6000, "transfer")
replayed = client.v1.transfers.create(
    params={"amount": 6000, "currency": "aud", "destination": account.id, "source_transaction": charge.id,
            "transfer_group": "spay_sdk"},
    options={"idempotency_key": "sdk-tr-1"},
)
check(replayed.id == transfer.id, "idempotent replay")

listed = client.v1.transfers.list(params={"transfer_group": "spay_sdk", "limit": 10})
check([t.id for t in listed.data] == [transfer.id] and listed.has_more is False, "transfer list")

reversal = client.v1.transfers.reversals.create(transfer.id, params={"amount": 1000})
check(isinstance(reversal, stripe.TransferReversal) and reversal.amount == 1000, "reversal")

# Refunds are paid from the platform's available balance, and the card payment's funds are still pending: top up
# through the simulator's control API, as a platform would top up its Stripe balance.
urllib.request.urlopen(
    urllib.request.Request(
        base + "/_sim/balance/top_up",
        data=json.dumps({"currency": "aud", "amount": 500}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
).read()
refund = client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 500})
check(isinstance(refund, stripe.Refund) and refund.amount == 500 and refund.status == "succeeded", "refund")

try:
    client.v1.payment_intents.create(
        params={"amount": 1000, "currency": "aud", "payment_method": "pm_card_chargeDeclined", "confirm": True}
    )
    raise AssertionError("a declined card must raise")
except stripe.CardError as e:
    check(e.code == "card_declined" and e.error.decline_code == "generic_decline", "card error")
    check(e.error.payment_intent.status == "requires_payment_method", "card error names the intent")

try:
    client.v1.transfers.create(params={"amount": 100, "currency": "aud", "destination": "acct_missing"})
    raise AssertionError("a missing destination must raise")
except stripe.InvalidRequestError as e:
    check("No such destination" in e.user_message and e.param == "destination", "invalid request error")

try:
    client.v1.transfers.create(
        params={"amount": 6001, "currency": "aud", "destination": account.id, "source_transaction": charge.id},
        options={"idempotency_key": "sdk-tr-1"},
    )
    raise AssertionError("reusing a key with other parameters must raise")
except stripe.IdempotencyError:
    check(True, "idempotency error")

# Stripe's idempotency error is an error *type*: the SDK raises IdempotencyError, with no code.
try:
    client.v1.transfers.create(
        params={"amount": 6002, "currency": "aud", "destination": account.id, "source_transaction": charge.id},
        options={"idempotency_key": "sdk-tr-1"},
    )
    raise AssertionError("reusing a key with other parameters must raise")
except stripe.IdempotencyError as e:
    check(e.error.type == "idempotency_error" and e.code is None, "idempotency error type, no code")

# A decline detaches the PaymentMethod; a bare confirm is refused; another card pays the same PaymentIntent.
try:
    client.v1.payment_intents.create(
        params={"amount": 2000, "currency": "aud", "payment_method": "pm_card_chargeDeclined", "confirm": True}
    )
    raise AssertionError("a declined card must raise")
except stripe.CardError as e:
    retry_pi = e.error.payment_intent
check(retry_pi.payment_method is None and retry_pi.cancellation_reason is None, "declined intent has no method")
try:
    client.v1.payment_intents.confirm(retry_pi.id)
    raise AssertionError("a confirm without a payment method must raise")
except stripe.InvalidRequestError as e:
    check(e.code == "payment_intent_unexpected_state", "bare confirm refused")
paid = client.v1.payment_intents.confirm(retry_pi.id, params={"payment_method": "pm_card_visa"})
check(paid.status == "succeeded" and paid.id == retry_pi.id, "retry with another card")

# Cancel: Stripe's reasons, and a succeeded PaymentIntent cannot be canceled.
open_pi = client.v1.payment_intents.create(params={"amount": 1000, "currency": "aud"})
canceled = client.v1.payment_intents.cancel(open_pi.id, params={"cancellation_reason": "abandoned"})
check(canceled.status == "canceled" and canceled.cancellation_reason == "abandoned", "cancellation reason")
try:
    client.v1.payment_intents.cancel(pi.id)
    raise AssertionError("canceling a succeeded PaymentIntent must raise")
except stripe.InvalidRequestError as e:
    check(e.code == "payment_intent_unexpected_state", "succeeded cannot be canceled")

# Validation: Stripe's codes, the parameter named.
try:
    client.v1.payment_intents.create(params={"amount": 1000, "currency": "aud", "colour": "red"})
    raise AssertionError("an unknown parameter must raise")
except stripe.InvalidRequestError as e:
    check(e.code == "parameter_unknown" and e.param == "colour", "unknown parameter")
try:
    client.v1.payment_intents.create(params={"currency": "aud"})
    raise AssertionError("a missing amount must raise")
except stripe.InvalidRequestError as e:
    check(e.code == "parameter_missing" and e.param == "amount", "missing parameter")
try:
    client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 100, "reason": "bored"})
    raise AssertionError("an unknown refund reason must raise")
except stripe.InvalidRequestError as e:
    check(e.param == "reason", "refund reason enum")
try:
    client.v1.transfers.create(
        params={"amount": 100, "currency": "aud", "destination": account.id, "metadata": {"k" * 41: "v"}}
    )
    raise AssertionError("a metadata key over 40 characters must raise")
except stripe.InvalidRequestError as e:
    check(e.param.startswith("metadata"), "metadata limits")

check(transfer.destination_payment.startswith("py_"), "destination payment")

# ending_before pages backwards.
second = client.v1.transfers.create(
    params={"amount": 100, "currency": "aud", "destination": account.id, "source_transaction": charge.id,
            "transfer_group": "spay_sdk"},
)
newer = client.v1.transfers.list(params={"transfer_group": "spay_sdk", "ending_before": transfer.id})
check([t.id for t in newer.data] == [second.id], "ending_before")

events = client.v1.events.list(params={"limit": 100})
check(all(isinstance(e, stripe.Event) for e in events.data) and len(events.data) > 5, "events")
check(any(e.type == "transfer.created" and e.data.object.id == transfer.id for e in events.data), "event payload")

balance = client.v1.balance.retrieve()
check(isinstance(balance, stripe.Balance) and balance.pending[0].currency == "aud", "balance")

print(f"official SDK: {checks} checks passed")
