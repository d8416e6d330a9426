package registry

import "errors"

// Sentinel errors of the registry.
var (
	// ErrInvalidHeartbeat means a heartbeat breaks a rule of its schema.
	ErrInvalidHeartbeat = errors.New("invalid heartbeat")
	// ErrWrongSubject means a heartbeat was published on another node's subject.
	ErrWrongSubject = errors.New("heartbeat on another node's subject")
	// ErrKeyNotBound means a heartbeat is signed by a key other than the
	// one its node id is bound to.
	ErrKeyNotBound = errors.New("node id is bound to another key")
	// ErrReplayed means a heartbeat is not newer than its node's last one.
	ErrReplayed = errors.New("heartbeat replayed")
	// ErrUnknownNode means a query names a node the registry does not list.
	ErrUnknownNode = errors.New("unknown node")
	// ErrChallengeFailed means a node's answer to a challenge was wrong,
	// late or missing.
	ErrChallengeFailed = errors.New("challenge failed")
)
