"""Bounces and complaints as remote mail systems send them (the forms of Postfix, Exchange
Online and an ARF feedback loop), for the bounce listener's tests. ``VERP`` stands for the
return path the relay gave the original message, ``RCPT`` for its recipient."""

from __future__ import annotations


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def postfix_dsn(verp: str, rcpt: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    """Postfix's bounce(8) message: headers only returned (text/rfc822-headers)."""
    code = "550" if status.startswith("5") else "450"
    return _crlf(f"""\
Return-Path: <>
Received: by mx.example.net (Postfix)
\tid 4F2B81C0F3A; Sun,  6 Dec 2026 10:02:11 +0000 (UTC)
Date: Sun,  6 Dec 2026 10:02:11 +0000 (UTC)
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4F2B81C0F3A.1765015331/mx.example.net"
Content-Transfer-Encoding: 7bit
Message-Id: <20261206100211.4F2B81C0F3A@mx.example.net>

This is a MIME-encapsulated message.

--4F2B81C0F3A.1765015331/mx.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{rcpt}>: host store.example.net[192.0.2.40] said: {code} {status}
    <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox
    table (in reply to RCPT TO command)

--4F2B81C0F3A.1765015331/mx.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: 4F2B81C0F3A
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: Sun,  6 Dec 2026 10:02:10 +0000 (UTC)

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: {action}
Status: {status}
Remote-MTA: dns; store.example.net
Diagnostic-Code: smtp; {code} {status} <{rcpt}>: Recipient address rejected:
    User unknown in virtual mailbox table

--4F2B81C0F3A.1765015331/mx.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers
Content-Transfer-Encoding: 7bit

Return-Path: <{verp}>
Received: from relay.doe.com (relay.doe.com [198.51.100.25])
\tby mx.example.net (Postfix) with ESMTPS id 4F2B81C0F3A
\tfor <{rcpt}>; Sun,  6 Dec 2026 10:02:10 +0000 (UTC)
From: news@doe.com
To: {rcpt}
Subject: November newsletter
Message-ID: <n1@doe.com>

--4F2B81C0F3A.1765015331/mx.example.net--
""")


def exchange_dsn(verp: str, rcpt: str) -> bytes:
    """Exchange Online's NDR: HTML notification, the original as message/rfc822."""
    return _crlf(f"""\
From: postmaster@contoso.onmicrosoft.com
To: {verp}
Date: Sun, 6 Dec 2026 10:05:00 +0000
Subject: Undeliverable: November newsletter
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="_000_AM0PR01MB12345CONTOSO_"
Content-Language: en-US
X-MS-Exchange-Message-Is-Ndr:
MIME-Version: 1.0

--_000_AM0PR01MB12345CONTOSO_
Content-Type: multipart/alternative;
\tboundary="_002_AM0PR01MB12345CONTOSO_"

--_002_AM0PR01MB12345CONTOSO_
Content-Type: text/plain; charset="us-ascii"

Your message to {rcpt} couldn't be delivered.
{rcpt.split('@')[0]} wasn't found at {rcpt.split('@')[1]}.

--_002_AM0PR01MB12345CONTOSO_
Content-Type: text/html; charset="us-ascii"

<html><body><p>Your message to {rcpt} couldn't be delivered.</p></body></html>

--_002_AM0PR01MB12345CONTOSO_--

--_000_AM0PR01MB12345CONTOSO_
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB12345.eurprd01.prod.outlook.com
Received-From-MTA: dns;relay.doe.com
Arrival-Date: Sun, 6 Dec 2026 10:04:58 +0000

Final-Recipient: rfc822;{rcpt}
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient
 {rcpt} not found by SMTP address lookup
X-Display-Name: {rcpt}

--_000_AM0PR01MB12345CONTOSO_
Content-Type: message/rfc822

Return-Path: <{verp}>
From: <news@doe.com>
To: <{rcpt}>
Subject: November newsletter
Date: Sun, 6 Dec 2026 10:04:57 +0000
Message-ID: <n1@doe.com>
MIME-Version: 1.0
Content-Type: text/plain

Hello.

--_000_AM0PR01MB12345CONTOSO_--
""")


def arf_complaint(verp: str, rcpt: str, feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 feedback report as mailbox providers' feedback loops send it."""
    return _crlf(f"""\
From: <staff@fbl.example.net>
Date: Sun, 6 Dec 2026 11:00:00 +0000
Subject: FW: November newsletter
To: <{verp}>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
198.51.100.25 on Sun, 6 Dec 2026 10:02:10 +0000.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <{verp}>
Original-Rcpt-To: <{rcpt}>
Arrival-Date: Sun, 6 Dec 2026 10:02:10 +0000
Reporting-MTA: dns; mail.example.net
Source-IP: 198.51.100.25
Authentication-Results: mail.example.net; spf=pass smtp.mail={verp}

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

Return-Path: <{verp}>
From: <news@doe.com>
To: <{rcpt}>
Subject: November newsletter
Message-ID: <n1@doe.com>

Hello.

--part1_13d.2e68ed54_boundary--
""")
