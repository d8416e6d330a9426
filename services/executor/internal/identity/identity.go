// Package identity is a node's ed25519 identity: an nkey user key pair whose
// public key ("U...") names the node to the grid and whose signatures vouch
// for the heartbeats and usage events it publishes. The seed is kept in a
// file readable only by its owner, so that a node keeps its identity (and its
// standing with the registry and settlement) across restarts.
package identity

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/nodesig"
)

// Identity is a node's key pair. It is safe for concurrent use.
type Identity struct {
	kp  nkeys.KeyPair
	pub string
}

// New creates a fresh identity held only in memory.
func New() (*Identity, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("create identity: %w", err)
	}
	return fromKeyPair(kp)
}

// FromSeed builds an identity from a user nkey seed ("SU..."); a NATS .creds
// file's contents are accepted too, and their seed is used.
func FromSeed(seed []byte) (*Identity, error) {
	kp, err := nkeys.ParseDecoratedUserNKey(seed)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadSeed, err)
	}
	return fromKeyPair(kp)
}

func fromKeyPair(kp nkeys.KeyPair) (*Identity, error) {
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("identity public key: %w", err)
	}
	return &Identity{kp: kp, pub: pub}, nil
}

// Load reads the identity from the seed file at path.
func Load(path string) (*Identity, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load identity: %w", err)
	}
	defer wipe(data)
	id, err := FromSeed(data)
	if err != nil {
		return nil, fmt.Errorf("load identity from %s: %w", path, err)
	}
	return id, nil
}

// LoadOrCreate loads the seed file at path or, when there is none, creates a
// new identity and saves its seed there (file mode 0600, missing directories
// 0700). Two processes racing on one path end up with the same identity.
func LoadOrCreate(path string) (*Identity, error) {
	id, err := Load(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return id, err
	}
	id, err = New()
	if err != nil {
		return nil, err
	}
	switch err := id.save(path); {
	case errors.Is(err, fs.ErrExist):
		return Load(path)
	case err != nil:
		return nil, err
	}
	return id, nil
}

// save writes the seed to a private temporary file and links it into place,
// so that path never holds a partial seed and an existing file is never
// replaced (fs.ErrExist).
func (id *Identity) save(path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	// Seed returns the key pair's own buffer: it must not be wiped here.
	seed, err := id.kp.Seed()
	if err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	// CreateTemp makes the file with mode 0600.
	tmp, err := os.CreateTemp(dir, ".identity-*")
	if err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(seed)
	if err == nil {
		_, err = tmp.WriteString("\n")
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("save identity to %s: %w", tmp.Name(), err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	return nil
}

// PublicKey is the node's public user nkey ("U...").
func (id *Identity) PublicKey() string { return id.pub }

// Sign returns the ed25519 signature of data.
func (id *Identity) Sign(data []byte) ([]byte, error) {
	sig, err := id.kp.Sign(data)
	if err != nil {
		return nil, fmt.Errorf("sign as %s: %w", id.pub, err)
	}
	return sig, nil
}

// Verify checks that sig is pub's ed25519 signature of data; pub must be a
// user nkey.
func Verify(pub string, data, sig []byte) error {
	return nodesig.Verify(pub, data, sig)
}

// wipe overwrites secret bytes once they are no longer needed.
func wipe(b []byte) {
	for i := range b {
		b[i] = 'x'
	}
}
