"""Layer 1: sans-I/O codecs for QEMU's migration wire formats.

Nothing in this package touches a socket, a file, a thread or a clock: bytes
in, typed records out; records in, bytes out. Page payloads never pass through
a codec; decoders say where the payload is and the I/O layer moves it.
"""
