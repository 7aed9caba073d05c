#!/usr/bin/env python3
"""An independent verifier of Mediator's published proofs, written from the docs only
(docs/proof-of-reserves.md, docs/liabilities-proof.md, docs/audit-log.md), with embit for the
Bitcoin parts and bitcoind's JSON-RPC for the chain. It shares no code with the Rust verifier.

    verify_reserves.py por FILE [--network NET] [--rpc URL --cookie FILE]
    verify_reserves.py inclusion FILE --account ID [--against POR_FILE]
    verify_reserves.py audit LOG [--proof POR_FILE ...]

Exit 0 and "OK ..." when the proof holds; exit 2 and "FAILED (code): reason" when it does not
or the input is not a proof. Requires embit==0.8.0.
"""

import argparse
import base64
import hashlib
import hmac
import json
import re
import sys
import urllib.request
from decimal import Decimal

from embit import ec
from embit.psbt import PSBT
from embit.script import Script

PREFIX = b"Proof-of-Reserves: "
POR_KEY = b"\x09"
SIGHASH_ALL = 1
MAX_SCAN_BLOCKS = 4032
NETWORKS = {"bitcoin": "main", "testnet": "test", "testnet4": "testnet4", "signet": "signet", "regtest": "regtest"}


class Fail(Exception):
    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


def read_json(path):
    try:
        with open(path, "rb") as f:
            data = f.read((64 << 20) + 1)
    except OSError as e:
        raise Fail("reading", str(e))
    if len(data) > 64 << 20:
        raise Fail("malformed", "larger than %d bytes" % (64 << 20))
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Fail("malformed", "not a JSON document: %s" % e)


def field(doc, name, kind):
    if not isinstance(doc, dict) or name not in doc or not isinstance(doc[name], kind) or isinstance(doc[name], bool):
        raise Fail("malformed", "field %r missing or not %s" % (name, kind.__name__))
    return doc[name]


def hex32(s, name):
    try:
        b = bytes.fromhex(s)
    except (TypeError, ValueError):
        b = b""
    if len(b) != 32:
        raise Fail("malformed", "%s is not 64 hex digits" % name)
    return b


def u64(s, name):
    # ASCII digits only: str.isdigit() also takes other scripts' digits and superscripts (int()
    # then reads the first, raises on the second), which the Rust verifier refuses.
    if not isinstance(s, str) or not re.fullmatch(r"[0-9]{1,20}", s) or int(s) >= 1 << 64:
        raise Fail("bad_amount", "%s is not a decimal u64" % name)
    return int(s)


# ----- the proof of reserves -----

def default_message(doc):
    roots = ", ".join("%s %s %s" % (a, l["root"], l["total"]) for a, l in sorted(doc["liabilities"].items()))
    return "Mediator reserves at block %d %s; liabilities %d: %s; audit head %s" % (
        doc["block_height"], doc["block_hash"], doc["liabilities_proof_id"], roots, doc["audit_head"])


def check_psbt(doc):
    """The BIP-127 checks; returns [(txid_hex, vout, value_sat, script_bytes)] of reserve inputs."""
    message = field(doc, "message", str).encode("utf-8")
    try:
        raw = base64.b64decode(field(doc, "psbt", str), validate=True)
        psbt = PSBT.parse(raw)
        tx = psbt.tx
    except Fail:
        raise
    except Exception as e:  # embit raises various errors on bad input
        raise Fail("malformed_psbt", "not a PSBT: %s" % (e or type(e).__name__))
    if len(psbt.inputs) < 2:
        raise Fail("commitment_mismatch", "no reserve input")
    first = psbt.inputs[0]
    want = hashlib.sha256(PREFIX + message).digest()
    # embit keeps txids in display order (reversed bytes).
    if bytes(reversed(first.txid)) != want or first.vout != 0:
        raise Fail("commitment_mismatch", "input 0 does not commit to the message")
    if first.final_scriptsig is not None and first.final_scriptsig.data:
        raise Fail("commitment_mismatch", "input 0 has a scriptSig")
    if first.final_scriptwitness is not None and first.final_scriptwitness.items:
        raise Fail("commitment_mismatch", "input 0 has a witness")
    if first.unknown.get(POR_KEY) != message:
        raise Fail("commitment_mismatch", "PSBT_IN_POR_COMMITMENT missing or not the message")
    if len(tx.vout) != 1:
        raise Fail("bad_outputs", "%d outputs, a proof has exactly one" % len(tx.vout))
    seen = set()
    out = []
    total = 0
    for i, inp in enumerate(psbt.inputs[1:], start=1):
        op = (inp.txid, inp.vout)
        if inp.txid == first.txid:
            raise Fail("commitment_mismatch", "input %d spends the commitment" % i)
        if op in seen:
            raise Fail("duplicate_input", "input %d repeats an outpoint" % i)
        seen.add(op)
        utxo = inp.witness_utxo
        if utxo is None:
            raise Fail("missing_utxo", "input %d has no witness UTXO" % i)
        spk = utxo.script_pubkey.data
        if len(spk) != 22 or spk[:2] != b"\x00\x14":
            raise Fail("unsupported_input", "input %d is not P2WPKH" % i)
        w = inp.final_scriptwitness
        if w is None or len(w.items) != 2:
            raise Fail("bad_signature", "input %d has no P2WPKH witness" % i)
        sig, pub = w.items
        # P2WPKH takes a compressed key only (BIP-143); the Rust verifier refuses others too.
        if len(pub) != 33 or pub[0] not in (2, 3):
            raise Fail("bad_signature", "input %d: not a compressed public key" % i)
        if hashlib.new("ripemd160", hashlib.sha256(pub).digest()).digest() != spk[2:]:
            raise Fail("bad_signature", "input %d: the key is not the UTXO's" % i)
        if not sig or sig[-1] != SIGHASH_ALL:
            raise Fail("bad_signature", "input %d is not signed SIGHASH_ALL" % i)
        script_code = Script(b"\x76\xa9\x14" + spk[2:] + b"\x88\xac")
        h = tx.sighash_segwit(i, script_code, utxo.value, SIGHASH_ALL)
        try:
            ok = ec.PublicKey.parse(pub).verify(ec.Signature.parse(sig[:-1]), h)
        except Exception:
            ok = False
        if not ok:
            raise Fail("bad_signature", "input %d: the signature does not verify" % i)
        total += utxo.value
        out.append((inp.txid.hex(), inp.vout, utxo.value, spk))
    if tx.vout[0].value != total:
        raise Fail("bad_outputs", "the output pays %d, the inputs sum to %d" % (tx.vout[0].value, total))
    return out, total


class Rpc:
    def __init__(self, url, cookie):
        self.url = url
        with open(cookie) as f:
            user_pass = f.read().strip()
        self.auth = "Basic " + base64.b64encode(user_pass.encode()).decode()

    def __call__(self, method, *params):
        body = json.dumps({"jsonrpc": "1.0", "id": 1, "method": method, "params": list(params)}).encode()
        req = urllib.request.Request(self.url, body, {"Authorization": self.auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read(), parse_float=Decimal)
        except urllib.error.HTTPError as e:
            reply = json.loads(e.read(), parse_float=Decimal)
        except OSError as e:
            raise Fail("node", str(e))
        if reply.get("error"):
            raise Fail("node", "%s: %s" % (method, reply["error"].get("message")))
        return reply["result"]


def sats(btc):
    return int(Decimal(btc) * 100_000_000)


def check_node(doc, inputs, rpc):
    chain = rpc("getblockchaininfo")["chain"]
    if NETWORKS.get(doc["network"]) != chain:
        raise Fail("wrong_network", "the proof is for %s, the node runs %s" % (doc["network"], chain))
    height = doc["block_height"]
    try:
        at = rpc("getblockhash", height)
    except Fail:
        at = None
    if at != doc["block_hash"]:
        raise Fail("block_not_in_chain", "block %d is not %s in the node's chain" % (height, doc["block_hash"]))
    gone = {}
    later = 0
    heights = {}  # the height of each block gettxout answered at (a block may arrive meanwhile)
    for txid, vout, value, spk in inputs:
        r = rpc("gettxout", txid, vout, False)
        if r is None:
            gone[(txid, vout)] = (value, spk)
            continue
        if sats(r["value"]) != value or bytes.fromhex(r["scriptPubKey"]["hex"]) != spk:
            raise Fail("utxo_mismatch", "%s:%d is not the output the PSBT signs for" % (txid, vout))
        best = r["bestblock"]
        if best not in heights:
            heights[best] = rpc("getblockheader", best, True)["height"]
        created = heights[best] - r["confirmations"] + 1
        if r["confirmations"] == 0 or created > height:
            raise Fail("utxo_after_block", "%s:%d was created after the stated block" % (txid, vout))
    tip = rpc("getblockcount")
    h = height + 1
    # A gone UTXO whose transaction is in a block after the stated one did not exist at it,
    # even though it is found spent after it.
    gone_txids = {txid for txid, _ in gone}
    made_after = set()
    while gone and h <= min(tip, height + MAX_SCAN_BLOCKS):
        block = rpc("getblock", rpc("getblockhash", h), 3)
        made_after.update(t["txid"] for t in block["tx"] if t["txid"] in gone_txids)
        for t in block["tx"]:
            for vin in t["vin"]:
                key = (vin.get("txid"), vin.get("vout"))
                if key in gone and key[0] in made_after:
                    raise Fail("utxo_after_block", "%s:%d was created after the stated block" % key)
                if key in gone:
                    value, spk = gone.pop(key)
                    p = vin.get("prevout") or {}
                    if sats(p.get("value", -1)) != value or bytes.fromhex(p.get("scriptPubKey", {}).get("hex", "")) != spk:
                        raise Fail("utxo_mismatch", "%s:%d is not the output the PSBT signs for" % key)
                    later += 1
        h += 1
    if gone:
        txid, vout = next(iter(gone))
        raise Fail("spent_at_block", "%s:%d was not unspent at block %d" % (txid, vout, height))
    return later


def cmd_por(args):
    doc = read_json(args.file)
    if field(doc, "version", int) != 1:
        raise Fail("version", "unsupported document version %r" % doc["version"])
    network = field(doc, "network", str)
    if network not in NETWORKS:
        raise Fail("wrong_network", "unknown network %r" % network)
    if args.network and args.network != network:
        raise Fail("wrong_network", "the proof is for %s, expected %s" % (network, args.network))
    field(doc, "block_height", int)
    field(doc, "liabilities_proof_id", int)
    hex32(field(doc, "block_hash", str), "block_hash")
    hex32(field(doc, "audit_head", str), "audit_head")
    liabilities = field(doc, "liabilities", dict)
    for asset, l in liabilities.items():
        # An asset symbol, and nothing that could read as another part of the signed message.
        if not (1 <= len(asset) <= 16 and all(c.isascii() and (c.isalnum() or c in "-_") for c in asset)):
            raise Fail("malformed", "liabilities key %r is not an asset symbol" % asset)
        hex32(field(l, "root", str), "liabilities.%s.root" % asset)
        u64(field(l, "total", str), "liabilities.%s.total" % asset)
    if "BTC" not in liabilities:
        raise Fail("malformed", "no BTC liabilities")
    inputs, total = check_psbt(doc)
    if field(doc, "reserves_sat", int) != total:
        raise Fail("reserves_mismatch", "reserves_sat %d is not the inputs' sum %d" % (doc["reserves_sat"], total))
    owed = int(liabilities["BTC"]["total"])
    if total < owed:
        raise Fail("below_liabilities", "reserves %d sat are below the BTC liabilities %d sat" % (total, owed))
    # The signatures cover the message only: it must name this document's block, roots, totals
    # and audit head (an operator's note may follow), or they say nothing of them.
    binding = default_message(doc)
    rest = doc["message"][len(binding):] if doc["message"].startswith(binding) else None
    if rest is None or not (rest == "" or rest.startswith("; note: ")):
        raise Fail("message_not_binding",
                   "the signed message does not name this document's block, liabilities and audit head")
    node = None
    if args.rpc:
        later = check_node(doc, inputs, Rpc(args.rpc, args.cookie))
        node = "every UTXO unspent at block %d (%d spent since)" % (doc["block_height"], later)
    print("OK: %d sat in %d UTXOs >= BTC liabilities %d sat at block %d; message binds: True; node: %s"
          % (total, len(inputs), owed, doc["block_height"], node or "NOT CHECKED"))


# ----- inclusion proofs -----

def leaf_hash(nonce, account, asset, balance):
    # Version 2: the account (kind 0x01, u32 big-endian) is hashed into the leaf.
    return hashlib.sha256(b"mediator-liability-leaf" + nonce + b"\x01" + account.to_bytes(4, "big")
                          + asset + b"\x00" + balance.to_bytes(8, "big")).digest()


def node_hash(lh, ls, rh, rs):
    return hashlib.sha256(b"mediator-liability-node" + lh + ls.to_bytes(8, "big") + rh + rs.to_bytes(8, "big")).digest()


PROOF_FIELDS = {"version", "proof_id", "account", "asset", "balance", "nonce", "index", "path", "root",
                "total", "audit_head", "created_ms"}


def cmd_inclusion(args):
    p = read_json(args.file)
    # A field this verifier does not check is an error, not silently ignored.
    if isinstance(p, dict) and set(p) - PROOF_FIELDS:
        raise Fail("malformed", "unknown field(s) %s" % sorted(set(p) - PROOF_FIELDS))
    steps = p.get("path") if isinstance(p, dict) else None
    for sib in steps if isinstance(steps, list) else []:
        if isinstance(sib, dict) and set(sib) - {"hash", "sum"}:
            raise Fail("malformed", "unknown field(s) %s in a path step" % sorted(set(sib) - {"hash", "sum"}))
    if field(p, "version", int) != 2:
        raise Fail("version", "unsupported proof version")
    account = field(p, "account", int)
    if not 0 <= account < 1 << 32:
        raise Fail("malformed", "account is not a u32")
    if account != args.account:
        raise Fail("account_mismatch", "the proof is for account %d, not account %d" % (account, args.account))
    asset = field(p, "asset", str).encode()
    if not 1 <= len(asset) <= 16 or b"\x00" in asset:
        raise Fail("bad_asset", "bad asset")
    balance = u64(field(p, "balance", str), "balance")
    nonce = hex32(field(p, "nonce", str), "nonce")
    index = field(p, "index", int)
    path = field(p, "path", list)
    root = hex32(field(p, "root", str), "root")
    total = u64(field(p, "total", str), "total")
    if len(path) > 40 or index < 0 or index >= 1 << len(path):
        raise Fail("bad_index", "the index does not fit the path")
    h, s = leaf_hash(nonce, account, asset, balance), balance
    for k, sib in enumerate(path):
        sh, ss = hex32(field(sib, "hash", str), "path hash"), u64(field(sib, "sum", str), "path sum")
        h = node_hash(sh, ss, h, s) if (index >> k) & 1 else node_hash(h, s, sh, ss)
        s += ss
        if s >= 1 << 64:
            raise Fail("overflow", "sums overflow")
    if h != root:
        raise Fail("root_mismatch", "the path does not lead to the root")
    if s != total:
        raise Fail("total_mismatch", "the path does not sum to the total")
    if args.against:
        doc = read_json(args.against)
        ls = doc.get("liabilities") if isinstance(doc, dict) else None
        l = ls.get(p["asset"]) if isinstance(ls, dict) else None
        if (not isinstance(l, dict) or doc.get("liabilities_proof_id") != p.get("proof_id")
                or str(l.get("root", "")).lower() != root.hex() or l.get("total") != str(total)):
            raise Fail("not_published", "the proof of reserves does not publish this root and total")
    print("OK: balance %d of %s of account %d included, root %s total %d" % (balance, p["asset"], account, root.hex(), total))


# ----- the audit log -----

def cmd_audit(args):
    try:
        with open(args.log, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Fail("reading", str(e))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        raise Fail("torn", "the last line has no newline")
    # acknowledged: break line -> the line of the first override naming it.
    prev, seq, hashes, breaks, acknowledged = b"\x00" * 32, 0, [], [], {}
    open_intents = {}
    for n, line in enumerate(lines, start=1):
        try:
            e = json.loads(line)
            ok = isinstance(e, dict) and e.get("seq") == seq + 1 and bytes.fromhex(e.get("prev", "")) == prev
            params = e.get("params") if isinstance(e, dict) else None
            params = params if isinstance(params, dict) else {}
            if isinstance(e, dict):
                # An intent entry "<action>.intent" stays open until an entry names it in
                # params.intent (docs/audit-log.md).
                closes = params.get("intent")
                open_intents.pop(closes, None)
                if str(e.get("action", "")).endswith(".intent"):
                    open_intents[e.get("seq")] = e.get("action")
            if isinstance(e, dict) and e.get("action") == "audit.override":
                for b in params.get("break_lines") or []:
                    if isinstance(b, int) and b < n:
                        acknowledged.setdefault(b, n)
            seq = e["seq"] if isinstance(e, dict) and isinstance(e.get("seq"), int) else seq
        except (ValueError, TypeError):
            ok = False
        if not ok:
            breaks.append(n)
        prev = hashlib.sha256(line).digest()
        hashes.append(prev)
    bad = [b for b in breaks if b not in acknowledged]
    if bad:
        raise Fail("broken_chain", "the chain breaks at line(s) %s" % bad)
    for proof in args.proof or []:
        head = hex32(field(read_json(proof), "audit_head", str), "audit_head")
        if head != b"\x00" * 32 and head not in hashes:
            raise Fail("head_missing", "no line of the log hashes to the audit head of %s" % proof)
        # The history the proof saw: up to its head, with the overrides made before it only.
        at = hashes.index(head) + 1 if head in hashes else 0
        seen = [b for b in breaks if b <= at and acknowledged.get(b, at + 1) > at]
        if seen:
            raise Fail("broken_chain", "the chain breaks at line(s) %s before the audit head of %s "
                       "(line %d), acknowledged only after it: rewritten after the proof" % (seen, proof, at))
    print("OK: %d entries, head %s; intents without outcome: %s" % (
        len(lines), prev.hex(), ", ".join("%s (%s)" % kv for kv in sorted(open_intents.items())) or "none"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("por")
    p.add_argument("file")
    p.add_argument("--network")
    p.add_argument("--rpc")
    p.add_argument("--cookie")
    p = sub.add_parser("inclusion")
    p.add_argument("file")
    p.add_argument("--account", type=int, required=True)
    p.add_argument("--against")
    p = sub.add_parser("audit")
    p.add_argument("log")
    p.add_argument("--proof", action="append")
    args = ap.parse_args()
    if getattr(args, "rpc", None) and not args.cookie:
        ap.error("--rpc needs --cookie")
    try:
        {"por": cmd_por, "inclusion": cmd_inclusion, "audit": cmd_audit}[args.cmd](args)
    except Fail as e:
        print("FAILED (%s): %s" % (e.code, e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
