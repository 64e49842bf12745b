"""VFIO migration: the uAPI v2 device state machine and ``vfio-sim``, a simulated device.

* :mod:`livemig.vfio.state_machine` -- the states, the arcs a driver implements and
  the kernel's rule for reaching any other state through them.
* :mod:`livemig.vfio.sim_device` -- a device with memory, config state, dirty tracking and a
  real data fd, driven through that state machine.
* :mod:`livemig.vfio.sim_format` -- the byte stream ``vfio-sim`` writes into its data fd.

See ``docs/vfio.md``.
"""
