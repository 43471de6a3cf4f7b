"""What a sending domain publishes for the mail this relay sends, checked in DNS: SPF (are
the relay's ``[delivery] outbound_addresses`` authorized?), DKIM (is each key's record
published and the same key?) and DMARC (present, its policy, and does the relay's mail
align?). Each check is ok, missing, wrong or unknown (not configured, or DNS gave no
answer), with the record to publish when it is not ok.
"""

from __future__ import annotations

from typing import Any

from mailrelay.dkim import DkimKey
from mailrelay.dnscheck import DnsFailure, SpfError, spf_check, spf_record, tags, txt_records

POLICIES = ("none", "quarantine", "reject")


def _publish(name: str, value: str) -> dict[str, str]:
    return {"name": name, "type": "TXT", "value": value}


def _mechanism(ip: str) -> str:
    return ("ip6:" if ":" in ip else "ip4:") + ip


async def check_spf(resolver, domain: str, outbound: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "record": None, "publish": None, "addresses": {}}
    try:
        found = spf_record(await txt_records(resolver, domain))
    except DnsFailure as e:
        return out | {"status": "unknown", "detail": f"DNS gave no answer ({e})"}
    out["record"] = found[0] if len(found) == 1 else None
    if not found:
        value = " ".join(["v=spf1", *map(_mechanism, outbound or ["ADDRESS"]), "~all"])
        return out | {"status": "missing", "detail": f"{domain} publishes no SPF record",
                      "publish": _publish(domain, value)}  # fmt: skip
    if len(found) > 1:
        return out | {"status": "wrong", "detail": f"{len(found)} SPF records: receivers "
                      "treat that as an error (publish one)"}  # fmt: skip
    if not outbound:
        return out | {"status": "unknown", "detail": "[delivery] outbound_addresses is not "
                      "set: which addresses to authorize is not known"}  # fmt: skip
    missing = []
    for ip in outbound:
        try:
            result = await spf_check(resolver, ip, domain)
        except SpfError as e:
            return out | {"status": "wrong", "detail": f"the record cannot be evaluated: {e}"}
        except DnsFailure as e:
            return out | {"status": "unknown", "detail": f"DNS gave no answer ({e})"}
        out["addresses"][ip] = result
        if result != "pass":
            missing.append(ip)
    if not missing:
        return out | {"detail": f"authorizes {', '.join(outbound)}"}
    version, _, rest = found[0].partition(" ")
    value = " ".join([version, *map(_mechanism, missing), rest]).strip()
    return out | {"status": "wrong", "detail": f"does not authorize {', '.join(missing)}",
                  "publish": _publish(domain, value)}  # fmt: skip


async def check_dkim(resolver, key: DkimKey, record: tuple[str, str]) -> dict[str, Any]:
    name, value = record
    out: dict[str, Any] = {"selector": key.selector, "state": key.state, "name": name,
                           "record": None, "publish": _publish(name, value)}  # fmt: skip
    try:
        found = await txt_records(resolver, name)
    except DnsFailure as e:
        return out | {"status": "unknown", "detail": f"DNS gave no answer ({e})"}
    keys = [r for r in found if "p" in tags(r)]
    if not keys:
        return out | {"status": "missing", "detail": f"nothing published at {name}"}
    expected = tags(value)["p"]
    for r in keys:
        if tags(r)["p"] == expected:
            return out | {"status": "ok", "record": r, "publish": None,
                          "detail": "published, the same key"}  # fmt: skip
    return out | {"status": "wrong", "record": keys[0],
                  "detail": "the published record holds another key"}  # fmt: skip


async def check_dmarc(resolver, domain: str, dkim_aligned: bool,
                      spf_aligned: bool) -> dict[str, Any]:  # fmt: skip
    name = f"_dmarc.{domain}"
    out: dict[str, Any] = {"name": name, "record": None, "policy": None, "publish": None,
                           "dkim_aligned": dkim_aligned, "spf_aligned": spf_aligned}
    try:
        found = [r for r in await txt_records(resolver, name)
                 if tags(r).get("v", "").upper() == "DMARC1"]  # fmt: skip
    except DnsFailure as e:
        return out | {"status": "unknown", "detail": f"DNS gave no answer ({e})"}
    if not found:
        return out | {"status": "missing", "detail": f"nothing published at {name}",
                      "publish": _publish(name, "v=DMARC1; p=none")}  # fmt: skip
    if len(found) > 1:
        return out | {"status": "wrong", "detail": f"{len(found)} DMARC records: receivers "
                      "ignore them all (publish one)"}  # fmt: skip
    record = out["record"] = found[0]
    policy = tags(record).get("p", "").lower()
    if policy not in POLICIES:
        version, _, rest = record.partition(";")
        fixed = f"{version.strip()}; p=none;{rest}".rstrip("; ")
        return out | {"status": "wrong", "publish": _publish(name, fixed),
                      "detail": "no valid p= policy (none, quarantine or reject)"}  # fmt: skip
    out["policy"] = policy
    if policy != "none" and not (dkim_aligned or spf_aligned):
        return out | {"status": "wrong", "detail": f"p={policy}, and the relay's mail aligns "
                      "neither by DKIM (no active key) nor by SPF: receivers will "
                      f"{'junk' if policy == 'quarantine' else 'refuse'} it"}  # fmt: skip
    how = [w for w, on in (("DKIM", dkim_aligned), ("SPF", spf_aligned)) if on]
    return out | {"status": "ok", "detail": f"p={policy}; the relay's mail aligns by "
                  f"{' and '.join(how)}" if how else f"p={policy}; the relay's mail does not "
                  "align (monitoring only)"}  # fmt: skip


async def check_domain(resolver, domain: str, outbound: list[str],
                       keys: list[tuple[DkimKey, tuple[str, str]]]) -> dict[str, Any]:
    """The report of ``domain``; ``keys`` are its DKIM keys with the record of each."""
    spf = await check_spf(resolver, domain, outbound)
    dkim = [await check_dkim(resolver, k, r) for k, r in keys]
    # The envelope sender is the client's, usually at the From: domain: SPF aligns when
    # the domain authorizes the relay. DKIM aligns when the relay signs for the domain.
    dkim_aligned = any(k.state == "active" for k, _ in keys)
    dmarc = await check_dmarc(resolver, domain, dkim_aligned, spf["status"] == "ok")
    checks = [spf, *dkim, dmarc]
    return {"domain": domain, "spf": spf, "dkim": dkim, "dmarc": dmarc,
            "ok": all(c["status"] == "ok" for c in checks)}  # fmt: skip


async def check_configured(config, keys, resolver, domain: str) -> dict[str, Any]:
    """``domain check --json`` of ``domain`` under the relay's ``config``, its DKIM keys
    from ``keys`` (IDkimKeys): what mailrelay-admin, the API and the panel all show."""
    pairs = [(k, await keys.txtRecord(k)) for k in await keys.ofDomain(domain)]
    return await check_domain(resolver, domain, config.delivery.outbound_addresses, pairs)
