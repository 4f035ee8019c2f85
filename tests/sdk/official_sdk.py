"""Drives the splitpay Stripe simulator through Stripe's official Python SDK (pinned in tests/official_sdk.rs).

Usage: official_sdk.py BASE_URL   (e.g. http://127.0.0.1:12111)
Exits 0 and prints "official SDK: N checks passed" when every response parses into the SDK's typed objects with
the expected values; raises otherwise.
"""
import sys

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

events = client.v1.events.list(params={"limit": 100})
check(all(isinstance(e, stripe.Event) for e in events.data) and len(events.data) > 5, "events")
check(any(e.type == "transfer.created" and e.data.object.id == transfer.id for e in events.data), "event payload")

balance = client.v1.balance.retrieve()
check(isinstance(balance, stripe.Balance) and balance.pending[0].currency == "aud", "balance")

print(f"official SDK: {checks} checks passed")
