"""vhost-user: a back-end library, a virtio-fs test back-end, and a front-end.

* :class:`~livemig.vhost_user.backend.VhostUserBackend` (subclass it) served by
  :class:`~livemig.vhost_user.backend.BackendServer`;
* :class:`~livemig.vhost_user.fs_backend.FsBackend`, the device behind
  ``livemig vhost-user-backend``;
* :class:`~livemig.vhost_user.frontend.VhostUserFrontend`, the front-end side a livemig
  machine uses to save and load a back-end's state.

The wire format and the session tables are in :mod:`livemig.wire.vhost_user`.
"""
