"""Writes a Synapse homeserver config for local development and tests.

Run with the venv's Python (it imports PyYAML and signedjson, both Synapse dependencies):

    .venv/bin/python scripts/synapse_config.py DIR --port N [--registration FILE]...

Writes DIR/homeserver.yaml, DIR/log.config and (once) DIR/localhost.signing.key. Secrets
(registration shared secret, macaroon and form secrets) are generated on the first run and
kept on later runs, so users registered earlier keep working; the port and the list of
appservice registrations are rewritten every time (Synapse reads registrations only at start).

We write the whole file instead of editing `--generate-config` output: that output is mostly
comments (and ends without a newline after its last comment line, so appending to it breaks
the last key), and generating it costs an extra Python start.
"""

import argparse
import os
import secrets
import sys

import yaml
from signedjson.key import generate_signing_key, write_signing_keys

SERVER_NAME = "localhost"

# Generous limits: tests register users, log in, join and send in bursts from one address.
LOOSE = {"per_second": 1000, "burst_count": 10000}


def rate_limits():
    return {
        "rc_message": LOOSE,
        "rc_registration": LOOSE,
        "rc_registration_token_validity": LOOSE,
        "rc_login": {"address": LOOSE, "account": LOOSE, "failed_attempts": LOOSE},
        "rc_admin_redaction": LOOSE,
        "rc_joins": {"local": LOOSE, "remote": LOOSE},
        "rc_joins_per_room": LOOSE,
        "rc_key_requests": LOOSE,
        "rc_3pid_validation": LOOSE,
        "rc_invites": {"per_room": LOOSE, "per_user": LOOSE, "per_issuer": LOOSE},
        "rc_third_party_invite": LOOSE,
        "rc_media_create": LOOSE,
        "rc_presence": {"per_user": LOOSE},
        "rc_delayed_event_mgmt": LOOSE,
        "rc_room_creation": LOOSE,
        "rc_reports": LOOSE,
        "rc_user_directory": LOOSE,
        "rc_profile": LOOSE,
    }


def log_config(path):
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": path,
                "encoding": "utf8",
            }
        },
        "loggers": {
            # Every SQL statement at INFO would dwarf everything else.
            "synapse.storage.SQL": {"level": "WARNING"},
            "twisted": {"level": "WARNING"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--registration", action="append", default=[])
    args = parser.parse_args()

    data_dir = os.path.abspath(args.dir)
    os.makedirs(data_dir, exist_ok=True)
    config_path = os.path.join(data_dir, "homeserver.yaml")

    old = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf8") as f:
            old = yaml.safe_load(f) or {}

    def kept_secret(key):
        return old.get(key) or secrets.token_urlsafe(32)

    key_path = os.path.join(data_dir, SERVER_NAME + ".signing.key")
    if not os.path.exists(key_path):
        with open(key_path, "w", encoding="utf8") as f:
            write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(2))])

    registrations = []
    for registration in args.registration:
        path = os.path.abspath(registration)
        if not os.path.isfile(path):
            sys.exit(f"synapse_config.py: registration file {registration} does not exist")
        registrations.append(path)

    log_path = os.path.join(data_dir, "log.config")
    with open(log_path, "w", encoding="utf8") as f:
        yaml.safe_dump(log_config(os.path.join(data_dir, "homeserver.log")), f)

    config = {
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{args.port}/",
        "pid_file": os.path.join(data_dir, "homeserver.pid"),
        "listeners": [
            {
                "port": args.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(data_dir, "homeserver.db")},
        },
        "log_config": log_path,
        "media_store_path": os.path.join(data_dir, "media_store"),
        "signing_key_path": key_path,
        "registration_shared_secret": kept_secret("registration_shared_secret"),
        "macaroon_secret_key": kept_secret("macaroon_secret_key"),
        "form_secret": kept_secret("form_secret"),
        "report_stats": False,
        # Test and demo passwords need no protection; the default (12) costs ~0.5 s a login.
        "bcrypt_rounds": 4,
        "enable_registration": False,
        # Offline: never ask matrix.org for keys.
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "app_service_config_files": registrations,
        # Appservice-mode end-to-end encryption: to-device messages, device lists and key
        # counts for the bot's device arrive inside transactions.
        "experimental_features": {
            "msc2409_to_device_messages_enabled": True,
            "msc3202_transaction_extensions": True,
        },
        # A local test server: no phone-home, no presence chatter.
        "presence": {"enabled": False},
        **rate_limits(),
    }
    tmp_path = config_path + ".tmp"
    with open(tmp_path, "w", encoding="utf8") as f:
        f.write("# Written by scripts/synapse_config.py; rewritten on every start.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(tmp_path, config_path)


if __name__ == "__main__":
    main()
