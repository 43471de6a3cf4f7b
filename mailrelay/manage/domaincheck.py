"""What a sending domain publishes for the mail this relay sends, checked in DNS: SPF (are
the relay's ``[delivery] outbound_addresses`` authorized?), DKIM (is each key's record
published and the same key?) and DMARC (present, its policy, and does the relay's mail
align?). Each check is ok, missing, wrong or unknown (not configured, or DNS gave no
answer), with the record to publish when it is not ok. An account's bounce domain (the
return path of its mail) is checked too: its MX must name the relay, its SPF authorize it.
"""

from __future__ import annotations

from typing import Any

from mailrelay.dkim import DkimKey
from mailrelay.dnscheck import (
    DnsFailure,
    SpfError,
    mx_records,
    spf_check,
    spf_record,
    tags,
    txt_records,
)

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


async def check_configured(config, keys, resolver, domain: str,
                           bounce_domain: str | None = None) -> dict[str, Any]:
    """``domain check --json`` of ``domain`` under the relay's ``config``, its DKIM keys
    from ``keys`` (IDkimKeys), and the return path of ``bounce_domain`` (its account's,
    bounce_domain_of): what mailrelay-admin, the API and the panel all show."""
    pairs = [(k, await keys.txtRecord(k)) for k in await keys.ofDomain(domain)]
    return await check_domain_with_return_path(resolver, domain,
                                               config.delivery.outbound_addresses, pairs,
                                               bounce_domain, config.bounces.mx_host)


# ---- the return path: an account's bounce domain (mailrelay/bounces/) ----


def record_line(publish: dict[str, str]) -> str:
    """A record to publish as a zone file line (TXT split into character-strings)."""
    from mailrelay.manage.dkim import zone_line

    if publish["type"] == "TXT":
        return zone_line(publish["name"], publish["value"])
    return f"{publish['name']}. IN {publish['type']} {publish['value']}"


def return_path_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The return-path item of a report as (label, check) rows, as SPF, DKIM and DMARC are
    shown (none without a bounce domain)."""
    rp = report.get("return_path")
    if rp is None:
        return []
    return [(f"return-path {kind}", {**rp[kind.lower()],
                                     "detail": f"{rp['domain']}: {rp[kind.lower()]['detail']}"})
            for kind in ("MX", "SPF")]  # fmt: skip


def bounce_domain_of(accounts, domain: str) -> str | None:
    """The bounce domain of the account (of ``accounts``) ``domain`` is authorized for."""
    found = sorted(a.bounce_domain for a in accounts if domain in a.domains and a.bounce_domain)
    return found[0] if found else None


async def check_return_path(resolver, bounce_domain: str, mx_host: str,
                            outbound: list[str]) -> dict[str, Any]:
    """The bounce domain's records: an MX naming the relay (``[bounces] mx_host``), so that
    bounces to its VERP addresses come back, and SPF authorizing the relay's addresses,
    since the envelope sender is there. Ok only when both are."""
    out: dict[str, Any] = {"domain": bounce_domain, "mx_host": mx_host, "record": None,
                           "publish": None}
    mx_publish = {"name": bounce_domain, "type": "MX", "value": f"10 {mx_host}."}
    try:
        mx = await mx_records(resolver, bounce_domain)
    except DnsFailure as e:
        mx = None
        mx_check = {"status": "unknown", "detail": f"DNS gave no answer ({e})"}
    if mx is None:
        pass
    elif not mx:
        mx_check = {"status": "missing", "detail": f"{bounce_domain} has no MX: bounces to "
                    "its addresses cannot come back", "publish": mx_publish}  # fmt: skip
    elif mx_host in {name for _, name in mx}:
        mx_check = {"status": "ok", "detail": f"MX {mx_host}"}
    else:
        mx_check = {"status": "wrong", "publish": mx_publish,
                    "detail": f"MX {', '.join(n for _, n in mx)}, not {mx_host}"}  # fmt: skip
    if mx:
        mx_check["record"] = " ".join(f"{p} {n}." for p, n in mx)
    out["mx"] = {"record": None, "publish": None, **mx_check}
    out["spf"] = spf = await check_spf(resolver, bounce_domain, outbound)
    for status in ("wrong", "missing", "unknown", "ok"):
        if status in (out["mx"]["status"], spf["status"]):
            out["status"] = status
            break
    out["detail"] = f"MX {out['mx']['status']}, SPF {spf['status']}"
    return out


async def check_domain_with_return_path(resolver, domain: str, outbound: list[str],
                                        keys: list[tuple[DkimKey, tuple[str, str]]],
                                        bounce_domain: str | None,
                                        mx_host: str) -> dict[str, Any]:
    """check_domain, and with a bounce domain its ``return_path`` report: the envelope
    sender is then at the bounce domain, so DMARC's SPF alignment (relaxed: a subdomain
    aligns) is that of the bounce domain's SPF."""
    report = await check_domain(resolver, domain, outbound, keys)
    if bounce_domain is None:
        return report
    rp = report["return_path"] = await check_return_path(resolver, bounce_domain, mx_host,
                                                         outbound)
    report["dmarc"] = await check_dmarc(resolver, domain, report["dmarc"]["dkim_aligned"],
                                        rp["spf"]["status"] == "ok")
    checks = [report["spf"], *report["dkim"], report["dmarc"], rp]
    report["ok"] = all(c["status"] == "ok" for c in checks)
    return report
