"""`python -m cloudfed.keys rotate CONFIG --party NAME` and friends, run by the party itself.

    rotate CONFIG --party NAME        new pending key pair + a statement signed by the old key on
                                      the exchange; the party's next round advertisement names the
                                      new key, that round's keys roster approves it, then the old
                                      private keys are destroyed
    rotate CONFIG --party NAME --cancel
                                      drop the pending pair and empty the exchange slot (e.g. the
                                      pending key may have leaked): no copy is approved later
    status CONFIG --party NAME        where the keys live, current / pending / pinned fingerprints
    new-material --party NAME         fresh key material (JSON) for an environment variable or a
                                      secret, and its fingerprint on stderr to pin

A configuration mistake prints its message (file, field, fix) and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from cloudfed.errors import CloudfedError, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloudfed.keys", description="A party's own private keys."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("rotate", "start a key rotation (approved by the next keys roster)"),
        ("status", "where the party's keys live and which fingerprints it holds and pins"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="run configuration (for the exchange and party storage)")
        cmd.add_argument("--party", required=True)
        if name == "rotate":
            cmd.add_argument(
                "--cancel", action="store_true", help="abandon the pending rotation for good"
            )
    fresh = sub.add_parser("new-material", help="key material for keys.source env or a secret")
    fresh.add_argument("--party", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cloudfed.federation import load_run_config
    from cloudfed.keys.rotation import cancel_rotation, rotate
    from cloudfed.keys.sources import party_key_source
    from cloudfed.party_policy import load_policy
    from cloudfed.protection.keys import generate_keys

    try:
        if args.command == "new-material":
            keys = generate_keys("party", args.party)
            print(json.dumps(keys.material()))
            print(f"fingerprint {keys.public_bundle().fingerprint}", file=sys.stderr)
            return 0
        cfg = load_run_config(args.config)
        if args.command == "rotate" and args.cancel:
            cancel_rotation(cfg, args.party)
            print(f"{args.party}: pending rotation cancelled; its current key stays in use")
            return 0
        if args.command == "rotate":
            statement = rotate(cfg, args.party)
            print(
                f"{args.party} rotates from {statement.old.fingerprint} to "
                f"{statement.new.fingerprint}; the old key stays in use until the next "
                "secure-aggregation round's keys roster approves the rotation"
            )
            return 0
        loaded = load_policy(args.party)
        source = party_key_source(cfg, cfg.party(args.party), loaded)
        held = source.load()
        print(f"source   {loaded.policy.keys.source} ({source.where})")
        for label, pair in (("current", held.current), ("pending", held.pending)):
            print(f"{label:8} {pair.public_bundle().fingerprint if pair else '-'}")
        print(f"pinned   {loaded.policy.pins.parties.get(args.party, '-')}")
    except (CloudfedError, ConfigError) as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
