"""What an attempt's results make of a message's state: the retry rules, without a reactor,
a spool or a clock (outcome.py is pure: time and jitter are arguments)."""

from __future__ import annotations

import copy

import pytest

from mailrelay.delivery.client import Result
from mailrelay.delivery.outcome import (
    SUPPRESSED,
    RetryPolicy,
    backoff,
    fold,
    mark_sent,
    postpone,
)
from mailrelay.spool.state import DeliveryState, RecipientState, RecipientStatus

PENDING, SENT, FAILED = RecipientStatus.PENDING, RecipientStatus.SENT, RecipientStatus.FAILED
T0 = 1_700_000_000.0  # when the message was received
POLICY = RetryPolicy(retry_first=60, retry_max=3600, lifetime=5 * 86400, delay_warning=0)


def run(state, results, *, now=T0 + 1, due=None, policy=POLICY, jitter=1.0, suppressed=(),
        notify_delay=None):
    """fold, checking on the way that it changed nothing it was given."""
    before, given = copy.deepcopy(state), list(results)
    step = fold(state, results, now=now, received_at=T0, due=due, policy=policy,
                jitter=jitter, suppressed=suppressed, notify_delay=notify_delay)
    assert state == before and list(results) == given
    return step


def statuses(state: DeliveryState) -> dict[str, RecipientStatus]:
    return {r: rs.status for r, rs in state.recipients.items()}


def test_all_accepted_done_nothing_to_bounce():
    step = run(DeliveryState.fresh(["a@x", "b@x"]),
               [Result("a@x", 250, "2.0.0 ok", "mx[1]"), Result("b@x", 251, "2.1.5 ok")])
    assert statuses(step.state) == {"a@x": SENT, "b@x": SENT}
    assert step.state.done and step.state.next_attempt is None
    assert (step.state.attempts, step.state.first_attempt, step.state.last_error) == (
        1, T0 + 1, "")
    assert step.state.recipients["a@x"] == RecipientState(SENT, 250, "2.0.0 ok", "mx[1]")
    assert (step.failed, step.delayed) == ([], [])
    assert [word for _, word in step.logged] == ["sent", "sent"]


def test_2xx_4xx_5xx_mix():
    results = [Result("ok@x", 250, "2.0.0 ok"), Result("later@x", 451, "4.2.0 greylisted"),
               Result("gone@x", 550, "5.1.1 unknown", "mx[2]")]
    step = run(DeliveryState.fresh(["ok@x", "later@x", "gone@x"]), results, jitter=0.95)
    assert statuses(step.state) == {"ok@x": SENT, "later@x": PENDING, "gone@x": FAILED}
    assert step.state.recipients["later@x"].text == "4.2.0 greylisted"
    assert step.state.last_error == "451 4.2.0 greylisted"
    assert step.failed == ["gone@x"]
    assert step.state.next_attempt == T0 + 1 + 60 * 0.95
    assert step.logged == [(results[0], "sent"), (results[1], "deferred"),
                           (results[2], "bounced")]


def test_all_refused_for_good_done_and_bounced():
    state = DeliveryState(attempts=1, last_error="451 4.2.0 earlier",
                          recipients={"a@x": RecipientState(), "b@x": RecipientState()})
    step = run(state, [Result("a@x", 550, "5.1.1 no"), Result("b@x", 554, "5.7.1 no")])
    assert step.state.done and step.state.next_attempt is None
    assert step.failed == ["a@x", "b@x"]
    assert step.state.last_error == ""  # only this attempt's temporary failures count


def test_a_temporary_reply_does_not_undo_a_recorded_outcome():
    state = DeliveryState(recipients={"a@x": RecipientState(SENT, 250, "ok"),
                                      "b@x": RecipientState(FAILED, 550, "no")})
    step = run(state, [Result("a@x", 421, "4.4.2 closed"), Result("b@x", 451, "later")])
    assert statuses(step.state) == {"a@x": SENT, "b@x": FAILED}
    assert [word for _, word in step.logged] == ["sent", "bounced"]


def test_last_error_is_the_last_temporary_reply():
    step = run(DeliveryState(last_error="old", recipients={"a@x": RecipientState(),
                                                           "b@x": RecipientState()}),
               [Result("a@x", 421, "4.3.2 busy"), Result("b@x", 450, "4.2.1 later")])
    assert step.state.last_error == "450 4.2.1 later"


def test_attempt_counts_and_first_attempt_kept():
    state = DeliveryState(attempts=3, first_attempt=T0 + 5, last_error="451 x",
                          recipients={"a@x": RecipientState(PENDING, 451, "x")})
    step = run(state, [Result("a@x", 451, "4.4.1 no answer")], now=T0 + 900)
    assert (step.state.attempts, step.state.first_attempt) == (4, T0 + 5)


@pytest.mark.parametrize(("attempts", "expected"), [
    (0, 60), (1, 60), (2, 120), (3, 240), (4, 480), (6, 1920), (7, 3600), (8, 3600),
    (40, 3600), (10_000, 3600)])
def test_backoff_doubles_up_to_retry_max(attempts, expected):
    assert backoff(attempts, POLICY, 1.0) == expected
    assert backoff(attempts, POLICY, 0.9) == pytest.approx(expected * 0.9)


def test_next_attempt_doubles_per_attempt_capped():
    policy = RetryPolicy(retry_first=60, retry_max=200, lifetime=10**9)
    state, now, delays = DeliveryState.fresh(["a@x"]), T0, []
    for _ in range(5):
        state = run(state, [Result("a@x", 451, "4.3.2 busy")], now=now,
                    policy=policy).state
        delays.append(state.next_attempt - now)
        now = state.next_attempt
    assert delays == [60, 120, 200, 200, 200]
    assert state.attempts == 5


def test_jitter_scales_the_wait_only():
    at = {j: run(DeliveryState.fresh(["a@x"]), [Result("a@x", 451, "x")], now=T0,
                 jitter=j).state.next_attempt for j in (0.9, 1.0)}
    assert at == {0.9: T0 + 54, 1.0: T0 + 60}


def test_next_attempt_never_after_the_expiry():
    policy = RetryPolicy(retry_first=600, retry_max=3600, lifetime=1000)
    step = run(DeliveryState.fresh(["a@x"]), [Result("a@x", 451, "x")], now=T0 + 990,
               policy=policy)
    assert statuses(step.state) == {"a@x": PENDING}
    assert step.state.next_attempt == T0 + 1000


def test_expiry_at_lifetime_bounces_pending_with_their_last_error():
    policy = RetryPolicy(lifetime=2 * 86400)
    state = DeliveryState.fresh(["slow@x", "ok@x", "never@x"])
    results = [Result("slow@x", 451, "4.4.5 try later", "mx[1]"),
               Result("ok@x", 250, "2.0.0 ok")]
    early = run(state, results, now=T0 + 2 * 86400 - 1, policy=policy)
    assert early.failed == [] and statuses(early.state)["slow@x"] is PENDING
    step = run(state, results, now=T0 + 2 * 86400, policy=policy)  # the exact moment
    assert statuses(step.state) == {"slow@x": FAILED, "ok@x": SENT, "never@x": FAILED}
    assert step.failed == ["slow@x", "never@x"]
    assert step.state.done and step.state.next_attempt is None
    slow = step.state.recipients["slow@x"]
    assert (slow.code, slow.remote) == (451, "mx[1]")
    assert slow.text == ("4.4.7 delivery time expired after 2 days; last error: "
                         "451 4.4.5 try later")
    never = step.state.recipients["never@x"]  # never tried: no reply to quote
    assert never.text == "4.4.7 delivery time expired after 2 days; last error:"
    assert [(r.recipient, r.code, word) for r, word in step.logged] == [
        ("slow@x", 451, "deferred"), ("ok@x", 250, "sent"), ("slow@x", 451, "expired"),
        ("never@x", 451, "expired")]


def test_expiry_without_results_still_bounces():
    """A message due after its lifetime (the relay was down) whose attempt tried nothing
    (stopped) is not folded; one with a result is."""
    state = DeliveryState(attempts=2, recipients={"a@x": RecipientState(PENDING, 421, "x")})
    assert run(state, [], now=T0 + 10 * 86400) is None
    step = run(state, [Result("a@x", 421, "4.4.2 dropped")], now=T0 + 10 * 86400)
    assert step.failed == ["a@x"] and step.state.attempts == 3


def test_delay_warning_once_at_the_first_attempt_past_the_threshold():
    policy = RetryPolicy(retry_first=60, retry_max=3600, delay_warning=100)
    state = DeliveryState.fresh(["a@x", "b@x"])
    busy = [Result("a@x", 451, "x"), Result("b@x", 250, "ok")]
    # before the threshold: no warning
    first = run(state, busy, now=T0 + 50, policy=policy)
    assert first.delayed == []
    # the attempt scheduled before the threshold and made after it: warn, once
    second = run(first.state, busy[:1], now=T0 + 110, due=T0 + 99, policy=policy)
    assert second.delayed == ["a@x"]
    # the one after, scheduled past the threshold: no second warning
    third = run(second.state, busy[:1], now=T0 + 200, due=T0 + 190, policy=policy)
    assert third.delayed == []
    # scheduled exactly at the threshold: that one warns
    assert run(first.state, busy[:1], now=T0 + 100, due=T0 + 100,
               policy=policy).delayed == ["a@x"]


def test_an_attempt_before_the_threshold_schedules_the_next_at_it():
    # Backoff alone would go from 3500 s to 7100 s and never make an attempt scheduled
    # before the threshold and made after it: the warning would never go.
    policy = RetryPolicy(retry_first=3600, retry_max=3600, delay_warning=4 * 3600)
    state = DeliveryState.fresh(["a@x"])
    step = run(state, [Result("a@x", 451, "x")], now=T0 + 3 * 3600 + 1800, policy=policy)
    assert step.delayed == [] and step.state.next_attempt == T0 + 4 * 3600
    warned = run(step.state, [Result("a@x", 451, "x")], now=T0 + 4 * 3600,
                 due=step.state.next_attempt, policy=policy)
    assert warned.delayed == ["a@x"] and warned.state.next_attempt == T0 + 5 * 3600


def test_delay_warning_per_recipient_as_its_notify_asks():
    policy = RetryPolicy(delay_warning=0, dsn_delay_warning=100)
    asked = {"delay@x": True, "failure-only@x": False, "none@x": None}
    state = DeliveryState.fresh(list(asked))
    busy = [Result(r, 451, "x") for r in asked]
    step = run(state, busy, now=T0 + 200, policy=policy, notify_delay=asked.get)
    assert step.delayed == ["delay@x"]
    # delay_warning applies to recipients without NOTIFY, and NOTIFY=DELAY's own setting
    # can be off
    policy = RetryPolicy(delay_warning=100, dsn_delay_warning=0)
    step = run(state, busy, now=T0 + 200, policy=policy, notify_delay=asked.get)
    assert step.delayed == ["none@x"]


def test_delay_warning_at_a_first_attempt_already_late():
    policy = RetryPolicy(delay_warning=100)
    step = run(DeliveryState.fresh(["a@x"]), [Result("a@x", 451, "x")], now=T0 + 200,
               due=None, policy=policy)
    assert step.delayed == ["a@x"]


def test_no_delay_warning_when_off_or_nothing_pending_or_expired():
    state = DeliveryState.fresh(["a@x"])
    assert run(state, [Result("a@x", 451, "x")], now=T0 + 10**6).delayed == []  # off
    policy = RetryPolicy(delay_warning=100, lifetime=1000)
    assert run(state, [Result("a@x", 250, "ok")], now=T0 + 200, policy=policy).delayed == []
    expired = run(state, [Result("a@x", 451, "x")], now=T0 + 1000, policy=policy)
    assert (expired.delayed, expired.failed) == ([], ["a@x"])


def test_partial_results_leave_untried_recipients_pending():
    state = DeliveryState.fresh(["a@x", "b@y", "c@z"])
    step = run(state, [Result("a@x", 250, "ok")])
    assert statuses(step.state) == {"a@x": SENT, "b@y": PENDING, "c@z": PENDING}
    assert step.state.recipients["b@y"] is state.recipients["b@y"]  # shared, unchanged
    assert step.state.next_attempt == T0 + 1 + 60 and step.state.last_error == ""


def test_results_already_saved_as_sent_are_folded_again_the_same():
    """A job that reported early had its accepted recipients saved (mark_sent); the
    conclusion folds every result of the attempt over that state."""
    state = DeliveryState.fresh(["a@x", "b@y"])
    ok, no = Result("a@x", 250, "2.0.0 ok", "mx[1]"), Result("b@y", 550, "5.1.1 no")
    saved = mark_sent(state, [ok])
    assert statuses(saved) == {"a@x": SENT, "b@y": PENDING}
    assert saved.attempts == 0 and state.recipients["a@x"].status is PENDING
    assert fold(saved, [ok, no], now=T0, received_at=T0, due=None, policy=POLICY,
                jitter=1.0) == fold(state, [ok, no], now=T0, received_at=T0, due=None,
                                    policy=POLICY, jitter=1.0)


def test_mark_sent_ignores_refusals_and_keeps_the_rest():
    state = DeliveryState(attempts=2, first_attempt=T0, next_attempt=T0 + 60,
                          last_error="451 x", recipients={"a@x": RecipientState(),
                                                          "b@x": RecipientState()})
    saved = mark_sent(state, [Result("a@x", 451, "later"), Result("b@x", 250, "ok")])
    assert statuses(saved) == {"a@x": PENDING, "b@x": SENT}
    assert (saved.attempts, saved.first_attempt, saved.next_attempt, saved.last_error) == (
        2, T0, T0 + 60, "451 x")


def test_suppressed_recipients_done_without_bounce():
    state = DeliveryState.fresh(["a@x", "blocked@x"])
    step = run(state, [Result("a@x", 250, "ok")], suppressed=["blocked@x"])
    blocked = step.state.recipients["blocked@x"]
    assert (blocked.status, blocked.code, blocked.text) == (FAILED, None, SUPPRESSED)
    assert step.failed == [] and step.state.done
    assert [r.recipient for r, _ in step.logged] == ["a@x"]  # nothing sent: not logged


def test_only_suppressed_recipients_is_no_attempt():
    state = DeliveryState(attempts=1, recipients={"blocked@x": RecipientState(
        PENDING, 451, "x", "mx[1]")})
    step = run(state, [], suppressed=["blocked@x"])
    assert step.state.done and step.state.attempts == 1  # no attempt made
    assert step.state.recipients["blocked@x"] == RecipientState(FAILED, None, SUPPRESSED,
                                                                "mx[1]")
    assert (step.failed, step.delayed, step.logged) == ([], [], [])


def test_suppressed_and_pending_others_are_retried():
    step = run(DeliveryState.fresh(["a@x", "blocked@x"]), [Result("a@x", 421, "x")],
               suppressed=["blocked@x"])
    assert statuses(step.state) == {"a@x": PENDING, "blocked@x": FAILED}
    assert step.state.next_attempt == T0 + 1 + 60


def test_nothing_tried_nothing_recorded():
    """Stopped (or the message deleted) before any job ran: no state to write."""
    assert run(DeliveryState.fresh(["a@x"]), []) is None


def test_a_done_state_without_results_is_concluded():
    """A state whose recipients are all done (the removal did not happen): fold says so,
    and the message is removed."""
    state = DeliveryState(attempts=1, recipients={"a@x": RecipientState(SENT, 250, "ok")})
    step = run(state, [])
    assert step.state.done and step.state.next_attempt is None and step.state.attempts == 1
    assert (step.failed, step.delayed, step.logged) == ([], [], [])


def test_a_result_for_a_recipient_the_state_lacks_is_recorded():
    step = run(DeliveryState.fresh(["a@x"]), [Result("new@x", 451, "x")])
    assert statuses(step.state) == {"a@x": PENDING, "new@x": PENDING}


def test_postpone_keeps_recipients_until_their_bounce_is_queued():
    step = run(DeliveryState.fresh(["gone@x", "ok@x"]),
               [Result("gone@x", 550, "5.1.1 no", "mx[1]"), Result("ok@x", 250, "ok")])
    kept = postpone(step.state, step.failed, T0 + 5, POLICY)
    assert kept.recipients["gone@x"] == RecipientState(PENDING, 550, "5.1.1 no", "mx[1]")
    assert kept.recipients["ok@x"].status is SENT
    assert kept.next_attempt == T0 + 5 + 60 and not kept.done
    assert step.state.recipients["gone@x"].status is FAILED  # the folded state untouched
