"""Authentication and authorization at the edge: the key a request presents, checked against
BANKCHURN_API_KEYS_FILE (serving.auth) for the scope its path needs, before any route runs."""

from __future__ import annotations

from starlette.types import Scope

from serving.auth import OPEN, PRINCIPAL_KEY, AuthError, KeyRing, Principal, credential, required_scope
from serving.edge.errors import HttpError


def principal_of(scope: Scope) -> Principal | None:
    """Who an admitted request acts for; None when authentication is off."""
    return scope.get(PRINCIPAL_KEY)


class Guard:
    """Admits a request or refuses it: 401 + WWW-Authenticate for a missing or unknown key,
    403 for a key without the path's scope. With no key ring (no keys file) every request is
    admitted, as nobody."""

    def __init__(self, keyring: KeyRing | None):
        self.keyring = keyring

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    def admit(self, scope: Scope) -> Principal | None:
        if self.keyring is None:
            return None
        need = required_scope(scope["path"])
        if need == OPEN:
            return None
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-api-key" and api_key is None:
                api_key = value.decode("latin-1")
        try:
            return self.keyring.check(credential(authorization, api_key), need)
        except AuthError as exc:
            scope[PRINCIPAL_KEY] = exc.principal  # a valid key without the scope: logged by name
            raise HttpError(exc.status, exc.message, headers=exc.headers) from None
