package accounts

import "errors"

// Sentinel errors of the accounts package.
var (
	// ErrUnknownRole means a role name is not one of Roles() or RoleAdmin.
	ErrUnknownRole = errors.New("unknown role")
	// ErrUnrestricted means a role has no permission template: admin may do
	// everything.
	ErrUnrestricted = errors.New("role has no permission template")
	// ErrNotInitialised means the secrets directory holds no operator and
	// account yet (run init first).
	ErrNotInitialised = errors.New("secrets directory not initialised")
	// ErrBadKey means a key file or public key is not the kind of nkey
	// expected.
	ErrBadKey = errors.New("bad nkey")
)
