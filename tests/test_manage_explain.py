"""manage/explain.py on its own: the steps and rules for the cases the end-to-end catalogue
(tests/test_e2e_explain.py) does not run through a relay: verification, quoted local
parts, the null sender, an account's domains, the running relay's rate-limit answer."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailrelay.manage.explain import NOT_RUNNING, Settings, UnknownUser, explain
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.scope import Scope

SETTINGS = Settings(max_message_size=1000, max_recipients=2, verify_senders=True)
ACME = Account("acme", frozenset({"acme.test", "other.test"}))


class ExplainTests(unittest.TestCase):
    def explain(self, user, sender, account=ACME, **options):
        return self.successResultOf(defer.ensureDeferred(
            explain(user, account, SETTINGS, sender, **options)))

    def test_accepted_names_the_scope_entry_and_ends_queued(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), "a@acme.test")
        self.assertTrue(result.accepted)
        self.assertEqual([s.step for s in result.steps],
                         ["AUTH", "MAIL FROM:<a@acme.test>", "RCPT TO", "DATA", "end of data"])
        self.assertEqual(result.steps[1].rule, "scope entry *@acme.test of user acme.test")
        doc = result.to_json()
        self.assertEqual(doc["limits"], NOT_RUNNING)
        self.assertEqual(doc["steps"][-1]["reply"], "250 2.0.0 Ok: queued as <queue id>")

    def test_address_entry_is_named_before_its_domain(self):
        user = SmtpUser("crm", account="acme", scope=Scope.parse("acme.test", "x@acme.test"))
        result = self.explain(user, "X@acme.test")
        self.assertEqual(result.steps[1].rule, "scope entry x@acme.test of user crm")

    def test_entry_awaiting_confirmation(self):
        user = SmtpUser("crm", account="acme", scope=Scope.parse("other.test"),
                        unverified=frozenset({"other.test"}))
        result = self.explain(user, "a@other.test")
        self.assertFalse(result.accepted)
        self.assertTrue(result.steps[-1].reply.startswith("550 5.7.1 sender <a@other.test> "
                                                          "not verified"))
        self.assertEqual(result.steps[-1].rule, "scope entry *@other.test of user crm awaits "
                                                "confirmation (verify_senders)")

    def test_domain_outside_the_account_is_refused_and_says_so(self):
        user = SmtpUser("crm", account="acme", scope=Scope.parse("acme.test;far.test"))
        result = self.explain(user, "a@far.test")
        self.assertEqual(result.steps[-1].reply,
                         "550 5.7.1 Sender address <a@far.test> not allowed for user crm")
        self.assertIn("senders: acme.test; within account acme's domains",
                      result.steps[-1].rule)

    def test_quoted_local_part(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), '"a b"@acme.test')
        self.assertTrue(result.steps[-1].reply.startswith("553 5.1.7"))
        self.assertEqual(result.steps[-1].rule, "quoted local part: scopes hold plain addresses")

    def test_null_sender(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), "")
        self.assertEqual(result.steps[-1].step, "MAIL FROM:<>")
        self.assertEqual(result.steps[-1].rule, "the null sender is never allowed to a login")

    def test_blocked_refuses_at_mail_whatever_the_sender(self):
        user = SmtpUser("acme.test", account="acme", status=Status.BLOCKED)
        result = self.explain(user, "a@acme.test")
        self.assertEqual(result.steps[-1].reply, "550 5.7.1 user acme.test is blocked")
        self.assertEqual(result.steps[-1].rule, "status blocked of user acme.test")

    def test_sandboxed_is_accepted_and_held(self):
        user = SmtpUser("acme.test", account="acme", status=Status.SANDBOXED)
        result = self.explain(user, "a@acme.test")
        self.assertTrue(result.accepted)
        self.assertIn("accepted and held, not delivered", result.steps[-1].rule)

    def test_recipients_over_the_limit(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), "a@acme.test",
                              recipients=3)
        self.assertEqual([s.reply for s in result.steps[2:]],
                         ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Too many recipients"])
        self.assertEqual(result.steps[-1].rule, "recipient 3 over [limits] max_recipients 2")

    def test_size_over_the_limit(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), "a@acme.test", size=1001)
        self.assertEqual(result.steps[-1].reply,
                         "552 5.3.4 Message size exceeds fixed limit of 1000 bytes")
        self.assertEqual(result.steps[-1].step, "MAIL FROM:<a@acme.test> SIZE=1001")

    def test_from_header_out_of_scope(self):
        result = self.explain(SmtpUser("acme.test", account="acme"), "a@acme.test",
                              from_header="boss@far.test")
        self.assertEqual(result.steps[-1].step, "end of data")
        self.assertEqual(result.steps[-1].reply, "550 5.7.1 From: header address "
                                                 "boss@far.test not allowed for user acme.test")

    def test_rate_limit_refusal_is_the_relays_reply(self):
        async def limits(user, account):
            return {"used_hour": 5, "used_minute": 0,
                    "refusal": "451 4.7.1 rate limit of 5 messages per hour exceeded, try "
                               "again in 60 seconds"}

        user = SmtpUser("acme.test", account="acme", rate_limit=5)
        result = self.explain(user, "a@acme.test", limit_state=limits)
        self.assertFalse(result.accepted)
        self.assertEqual(result.steps[-1].reply, "451 4.7.1 rate limit of 5 messages per "
                                                 "hour exceeded, try again in 60 seconds")
        self.assertEqual(result.steps[-1].rule,
                         "rate limit of user acme.test (5 per hour): 5 counted this hour")
        self.assertEqual(result.to_json()["limits"]["used_hour"], 5)

    def test_quotas_are_shown_and_a_full_one_refuses_with_the_relays_reply(self):
        quota = {"subject": "account", "name": "acme", "period": "month", "limit": 100,
                 "used": 60, "held": 1, "resets": "2027-01-01 00:00 UTC"}
        state = {"used_hour": 0, "used_minute": 0, "refusal": "", "quota": [quota],
                 "quota_refusal": ""}

        async def limits(user, account):
            return state

        user = SmtpUser("acme.test", account="acme")
        result = self.explain(user, "a@acme.test", limit_state=limits)
        self.assertTrue(result.accepted)
        self.assertIn("monthly quota of account acme: 60 of 100 (1 open), resets at "
                      "2027-01-01 00:00 UTC", result.steps[1].rule)
        quota["used"] = 99
        state["quota_refusal"] = ("451 4.7.1 monthly quota of 100 messages of account acme "
                                  "reached, it resets at 2027-01-01 00:00 UTC")
        result = self.explain(user, "a@acme.test", limit_state=limits)
        self.assertFalse(result.accepted)
        self.assertEqual(result.steps[-1].reply, state["quota_refusal"])
        self.assertEqual(result.steps[-1].rule, "monthly quota of account acme: 99 of 100 "
                                                "(1 open), resets at 2027-01-01 00:00 UTC")

    def test_a_user_whose_mail_over_quota_is_held_gets_250_saying_held(self):
        quota = {"subject": "user", "name": "acme.test", "period": "day", "limit": 10,
                 "used": 10, "held": 0, "resets": "2026-12-07 00:00 UTC"}

        async def limits(user, account):
            return {"used_hour": 0, "used_minute": 0, "refusal": "", "quota": [quota],
                    "quota_refusal": "451 4.7.1 daily quota of 10 messages of user acme.test "
                                     "reached, it resets at 2026-12-07 00:00 UTC"}

        user = SmtpUser("acme.test", account="acme", quota_action="hold")
        result = self.explain(user, "a@acme.test", limit_state=limits)
        self.assertTrue(result.accepted)
        self.assertEqual(result.steps[-1].reply,
                         "250 2.0.0 Ok: queued as <queue id>, held: daily quota of 10 "
                         "messages of user acme.test reached, released at 2026-12-07 00:00 UTC")
        self.assertIn("held until the quota resets", result.steps[-1].rule)

    def test_unknown_user(self):
        d = defer.ensureDeferred(explain(None, None, SETTINGS, "a@acme.test"))
        self.failureResultOf(d, UnknownUser)
