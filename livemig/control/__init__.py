"""Front end: a QMP-compatible control socket (layer 4).

:class:`QmpServer` speaks QMP as QEMU 10 does, so clients written for QEMU
(``qemu.qmp``, libvirt-style management code) drive livemig unchanged; the
engine supplies the command table. See docs/qmp.md.
"""

from livemig.control.qmp_server import Handler, QmpError, QmpServer, check_arguments

__all__ = ["Handler", "QmpError", "QmpServer", "check_arguments"]
