package identity

import (
	"errors"

	"github.com/tessera-grid/tessera/pkg/nodesig"
)

// Sentinel errors of node identities. The signature errors are nodesig's,
// so that errors.Is matches them whichever package reported them.
var (
	// ErrBadSeed means a seed file holds no usable user nkey seed.
	ErrBadSeed = errors.New("not a user nkey seed")
	// ErrBadPublicKey means a public key is not a user nkey ("U...").
	ErrBadPublicKey = nodesig.ErrBadPublicKey
	// ErrBadSignature means a signature does not verify against the data
	// and public key, or is not valid base64.
	ErrBadSignature = nodesig.ErrBadSignature
	// ErrUnsigned means a message carries no signature.
	ErrUnsigned = nodesig.ErrUnsigned
	// ErrKeyMismatch means a message names a public key other than the
	// identity asked to sign it.
	ErrKeyMismatch = nodesig.ErrKeyMismatch
)
