"""The mail that tells an account its webhook endpoint answered 410 Gone and was
disabled; it goes through the spool to the account's notification address, with the null
envelope sender, as the relay's other notices do."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid

from twisted.logger import Logger

from mailrelay.webhooks.store import Endpoint

log = Logger()


class GoneNotices:
    """``directory``: where the account's notification address is found (None: nowhere);
    ``submit(sender, recipients, bytes)`` queues the message."""

    def __init__(self, directory, submit, postmaster: str, hostname: str, clock) -> None:
        self.directory = directory
        self.submit = submit
        self.postmaster = postmaster
        self.hostname = hostname
        self.clock = clock

    async def __call__(self, account_name: str, endpoint: Endpoint) -> None:
        if self.directory is None:  # could not be opened (logged then)
            log.warn("webhook endpoint {id} of {account} disabled: no notice mailed, the "
                     "directory is not open", id=endpoint.id, account=account_name)
            return
        try:
            account = await self.directory.getAccount(account_name)
            if account is None or not account.notify:
                log.info("webhook endpoint {id} of {account} disabled: the account has no "
                         "notification address", id=endpoint.id, account=account_name)
                return
            await self.submit("", [account.notify], self.compose(account.notify, account_name,
                                                                 endpoint))
        except Exception:
            log.failure("cannot queue the notice of the disabled webhook endpoint {id}",
                        id=endpoint.id)

    def compose(self, to: str, account: str, endpoint: Endpoint) -> bytes:
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr(("Mail relay", self.postmaster))
        msg["To"] = to
        # The URL is left to the body: a long Subject folds badly in some readers.
        msg["Subject"] = f"Webhook endpoint {endpoint.id} disabled: it answered 410 Gone"
        msg["Date"] = formatdate(self.clock.seconds(), usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content("\n".join([
            f"The webhook endpoint {endpoint.id} of the account {account},",
            f"  {endpoint.url}",
            "answered 410 Gone. The relay has disabled it: no further events are sent",
            "there, and its pending events are in the failed-events view.",
            "",
            "Once the endpoint is back, enable it and send the failed events again:",
            f"  mailrelay-admin webhook enable {endpoint.id}",
            f"  mailrelay-admin webhook retry --endpoint {endpoint.id}",
        ]) + "\n")
        return msg.as_bytes()
