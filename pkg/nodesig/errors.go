package nodesig

import "errors"

// Sentinel errors of heartbeat signatures.
var (
	// ErrBadPublicKey means a public key is not a user nkey ("U...").
	ErrBadPublicKey = errors.New("not a user nkey public key")
	// ErrBadSignature means a signature does not verify against the data
	// and public key, or is not valid base64.
	ErrBadSignature = errors.New("signature does not verify")
	// ErrUnsigned means a message carries no signature.
	ErrUnsigned = errors.New("message is not signed")
	// ErrKeyMismatch means a message names a public key other than the
	// one asked to sign or verify it.
	ErrKeyMismatch = errors.New("message names another public key")
)
