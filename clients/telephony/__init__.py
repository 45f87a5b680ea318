"""Telephony simulators (Twilio Media Streams, Asterisk AudioSocket) and example configs."""
