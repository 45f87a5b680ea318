"""Every WebSocket close code the server sends, named once, so that each transport and dialect
closes with the same number for the same reason (clients act on them: see clients/client.py)."""

CLOSE_NORMAL = 1000  # the stream ended as asked
CLOSE_GOING_AWAY = 1001  # the server is draining and the stream's finals are delivered
CLOSE_POLICY = 1008  # policy violation
CLOSE_TOO_BIG = 1009  # a frame over server.max_frame_bytes (sent by the websockets library)
CLOSE_INTERNAL = 1011  # an unexpected server error ended the connection
CLOSE_TRY_AGAIN = 1013  # overloaded or the drain grace ran out: reconnect later
CLOSE_BAD_CONFIG = 4001  # invalid session configuration or audio format
CLOSE_BAD_SEQUENCE = 4002  # messages in an order the protocol does not allow
CLOSE_NO_CALL = 4004  # no such call to subscribe to (it did not start within the hold time)
CLOSE_RESUME_FAILED = 4005  # no session to resume (unknown token, ended) or a bad last_seq
