"""The only part of kubelvs that talks to the API server (through the kubernetes client).

Only the client's submodules kubelvs uses are imported (see :mod:`kubelvs.lazypackages`): the
package's ``__init__`` would also import the kubeconfig loader (requests, oauthlib, google-auth,
yaml), the dynamic client, streams and the informer, which a director in a pod never uses.
"""

from kubelvs.lazypackages import defer

for _package in ("kubernetes", "kubernetes.config", "kubernetes.utils"):
    defer(_package)
