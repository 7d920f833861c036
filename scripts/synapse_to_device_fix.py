"""Synapse module for test and dev homeservers: stop appservices losing to-device messages.

Synapse 1.163 (MSC2409, `msc2409_to_device_messages_enabled`) loses to-device messages for
appservice users when two `sendToDevice` requests run concurrently:

- each request notifies appservices with the to-device stream's *current token* (the highest
  id such that every lower id is persisted), together with the recipients of *its own*
  message only;
- for every appservice, the handler reads the messages of the notified recipients it is
  interested in between its stored position and that token, then stores the token as its
  new position, also when it was interested in none of them.

So when a message to the bot (id N) is persisted while an unrelated message (id N-1, between
two other users) is still being written, the bot's notification carries token N-2 and finds
nothing; the unrelated request then notifies token N for users the bot does not care about,
and the bot's position moves past N without N ever being read. The room key in that message
never reaches the bot. Tests share one homeserver and run concurrently, so they hit this.

This module makes each notification read the messages of *every* recipient with messages in
the range, not only the notified ones, so no message is skipped. It changes nothing else.
Loaded through `modules:` in the homeserver config written by `synapse_config.py`.
"""

import logging

from synapse.handlers.appservice import ApplicationServicesHandler

logger = logging.getLogger(__name__)

_original = ApplicationServicesHandler._get_to_device_messages


async def _get_to_device_messages(self, service, new_token, users):
    from_key = await self.store.get_type_stream_id_for_appservice(service, "to_device")
    rows = await self.store.db_pool.execute(
        "mxpay_to_device_fix_recipients",
        "SELECT DISTINCT user_id FROM device_inbox WHERE ? < stream_id AND stream_id <= ?",
        from_key,
        new_token,
    )
    recipients = {str(user) for user in users} | {row[0] for row in rows}
    return await _original(self, service, new_token, sorted(recipients))


class ToDeviceFix:
    """The module Synapse loads; patching happens once, at load."""

    def __init__(self, config, api):
        if ApplicationServicesHandler._get_to_device_messages is not _get_to_device_messages:
            ApplicationServicesHandler._get_to_device_messages = _get_to_device_messages
            logger.info("appservice to-device delivery fix installed")

    @staticmethod
    def parse_config(config):
        return config
