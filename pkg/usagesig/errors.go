package usagesig

import "errors"

var (
	// ErrMalformed means an event's signature fields cannot be decoded: not
	// base64, wrong lengths, or a public key that is not a user nkey.
	ErrMalformed = errors.New("malformed usage signature")
	// ErrBadSignature means an event's signature does not verify: the event
	// was altered after signing, or signed with another key.
	ErrBadSignature = errors.New("bad usage signature")
)
