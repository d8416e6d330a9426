package accounts

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// Secrets is a directory holding the grid's operator, its accounts, one
// scoped signing key per role and the credentials issued so far:
//
//	operator.nk, operator.jwt        the operator (keep its seed offline)
//	accounts/SYS.nk, SYS.jwt         the system account
//	accounts/<ACCOUNT>.nk, .jwt      the grid's account
//	signing/<role>.nk                scoped signing key of each role
//	signing/issuer.nk                unscoped key for admin and leaf users
//	users/<role>-<name>.{jwt,creds,env}
//
// Seeds (.nk, .creds) are written readable by the owner only; the
// directory must never be committed (.gitignore lists secrets/).
type Secrets struct {
	dir      string
	operator nkeys.KeyPair
	system   nkeys.KeyPair
	account  nkeys.KeyPair
	name     string
}

// InitOptions configures Init.
type InitOptions struct {
	// Operator names the operator (default "tessera").
	Operator string
	// Account names the grid's account (default "TESSERA").
	Account string
	// DiskStorage and MemoryStorage cap the account's JetStream storage in
	// bytes; zero means unlimited.
	DiskStorage, MemoryStorage int64
}

// Files in a secrets directory.
const (
	operatorSeed = "operator.nk"
	operatorJWT  = "operator.jwt"
	accountsDir  = "accounts"
	signingDir   = "signing"
	usersDir     = "users"
	systemName   = "SYS"
	issuerKey    = "issuer"
	accountFile  = "account"
)

// Init creates (or completes) a secrets directory: keys that exist are
// kept, and the operator and account JWTs are signed again, keeping the
// account's revocations. It is safe to run again after an upgrade that
// changes role templates: issued users need no change.
func Init(dir string, o InitOptions) (*Secrets, error) {
	if o.Operator == "" {
		o.Operator = "tessera"
	}
	if o.Account == "" {
		o.Account = "TESSERA"
	}
	if err := subjects.Token(o.Account); err != nil {
		return nil, fmt.Errorf("account name: %w", err)
	}
	for _, d := range []string{dir, filepath.Join(dir, accountsDir), filepath.Join(dir, signingDir), filepath.Join(dir, usersDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	// The grid account's name is recorded so that Open finds it.
	if err := writeFile(filepath.Join(dir, accountsDir, accountFile), []byte(o.Account+"\n"), 0o600); err != nil {
		return nil, err
	}
	s := &Secrets{dir: dir, name: o.Account}
	var err error
	if s.operator, err = loadOrCreate(filepath.Join(dir, operatorSeed), nkeys.PrefixByteOperator); err != nil {
		return nil, err
	}
	if s.system, err = loadOrCreate(s.accountPath(systemName, ".nk"), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if s.account, err = loadOrCreate(s.accountPath(o.Account, ".nk"), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	for _, k := range append(roleKeys(), issuerKey) {
		if _, err := loadOrCreate(s.signingPath(k), nkeys.PrefixByteAccount); err != nil {
			return nil, err
		}
	}
	sysPub, _ := s.system.PublicKey()
	oc := jwt.NewOperatorClaims(mustPublic(s.operator))
	oc.Name = o.Operator
	oc.SystemAccount = sysPub
	token, err := oc.Encode(s.operator)
	if err != nil {
		return nil, fmt.Errorf("operator jwt: %w", err)
	}
	if err := writeFile(filepath.Join(dir, operatorJWT), []byte(token), 0o644); err != nil {
		return nil, err
	}
	sc := jwt.NewAccountClaims(sysPub)
	sc.Name = systemName
	if err := s.signAccount(sc, systemName); err != nil {
		return nil, err
	}
	ac, err := s.accountClaims()
	if err != nil {
		return nil, err
	}
	ac.Name = o.Account
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{
		DiskStorage: unlimited(o.DiskStorage), MemoryStorage: unlimited(o.MemoryStorage),
		Streams: jwt.NoLimit, Consumer: jwt.NoLimit, MaxAckPending: jwt.NoLimit,
	}
	ac.SigningKeys = jwt.SigningKeys{}
	issuer, err := s.signingKey(issuerKey)
	if err != nil {
		return nil, err
	}
	ac.SigningKeys.Add(mustPublic(issuer))
	for _, role := range Roles() {
		kp, err := s.signingKey(string(role))
		if err != nil {
			return nil, err
		}
		p, err := Template(role, JetStream{})
		if err != nil {
			return nil, err
		}
		scope := jwt.NewUserScope()
		scope.Key = mustPublic(kp)
		scope.Role = string(role)
		scope.Description = "Tessera " + string(role) + "; {{name()}} is the user's name"
		scope.Template.Permissions = p.jwt()
		scope.Template.AllowedConnectionTypes = jwt.StringList{jwt.ConnectionTypeStandard}
		ac.SigningKeys.AddScopedSigner(scope)
	}
	if err := s.signAccount(ac, o.Account); err != nil {
		return nil, err
	}
	return s, nil
}

// Open opens a secrets directory made by Init.
func Open(dir string) (*Secrets, error) {
	name, err := os.ReadFile(filepath.Join(dir, accountsDir, accountFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w (run init)", dir, ErrNotInitialised)
	}
	if err != nil {
		return nil, err
	}
	s := &Secrets{dir: dir, name: strings.TrimSpace(string(name))}
	if s.operator, err = load(filepath.Join(dir, operatorSeed), nkeys.PrefixByteOperator); err != nil {
		return nil, err
	}
	if s.system, err = load(s.accountPath(systemName, ".nk"), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if s.account, err = load(s.accountPath(s.name, ".nk"), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	return s, nil
}

// Dir is the secrets directory.
func (s *Secrets) Dir() string { return s.dir }

// AccountPublicKey is the grid account's public key.
func (s *Secrets) AccountPublicKey() string { return mustPublic(s.account) }

// Identity is one user to issue credentials for.
type Identity struct {
	Role Role
	// Name is the node id (executor), the customer id (customer), or a
	// label of the instance (services, admin).
	Name string
	// PublicKey, when set, is the user's own nkey ("U..."), for example an
	// executor's node identity: only a JWT is issued and the seed never
	// leaves its owner. Empty: a key pair is made and a .creds file written.
	PublicKey string
	// Expires, when positive, limits the credentials' lifetime.
	Expires time.Duration
}

// Issued names the files Issue wrote.
type Issued struct {
	// PublicKey is the user's nkey.
	PublicKey string
	// JWT is the path of the user JWT.
	JWT string
	// Creds is the path of the .creds file (JWT and seed); empty when the
	// identity brought its own public key.
	Creds string
	// Env is the path of an environment file with the NATS_* settings the
	// identity must run with (for systemd's EnvironmentFile).
	Env string
}

// Issue signs a user JWT for id with its role's scoped signing key (admin:
// the unscoped issuer key) and writes it, with a .creds file and an
// environment file, under users/.
func (s *Secrets) Issue(id Identity) (Issued, error) {
	if err := subjects.Token(id.Name); err != nil {
		return Issued{}, fmt.Errorf("%s name: %w", id.Role, err)
	}
	signer := string(id.Role)
	if id.Role == RoleAdmin {
		signer = issuerKey
	} else if !slices.Contains(Roles(), id.Role) {
		return Issued{}, fmt.Errorf("role %q: %w", id.Role, ErrUnknownRole)
	}
	return s.issue(id, signer, nil, nil)
}

// IssueLeaf issues the credentials of a supplier site's leaf node: one user
// whose permissions are the union of its nodes' executor permissions (with
// the JetStream API of domain, which the site's clients use), that may only
// connect as a leaf node.
func (s *Secrets) IssueLeaf(supplier string, nodes []string, domain string, expires time.Duration) (Issued, error) {
	if len(nodes) == 0 {
		return Issued{}, fmt.Errorf("leaf of supplier %s: no nodes", supplier)
	}
	var ps []Permissions
	for _, n := range nodes {
		p, err := For(RoleExecutor, n, JetStream{Domain: domain})
		if err != nil {
			return Issued{}, err
		}
		ps = append(ps, p)
	}
	p := Merge(ps...)
	// A leaf node forwards a reply only to subjects the grid has told it
	// about, and the grid tells it only about subjects it may publish to:
	// replies to the services that send nodes requests (the router's stage
	// and control requests, the registry's challenges) need their inboxes
	// listed. Within them, a reply reaches a request only with its
	// unguessable reply token.
	p.Publish = append(p.Publish, subjects.ServiceInbox(string(RoleRouter))+".>", subjects.ServiceInbox(string(RoleRegistry))+".>")
	return s.issue(Identity{Role: RoleLeaf, Name: supplier, Expires: expires}, issuerKey, &p, jwt.StringList{jwt.ConnectionTypeLeafnode})
}

func (s *Secrets) issue(id Identity, signer string, perms *Permissions, conn jwt.StringList) (Issued, error) {
	kp, err := s.signingKey(signer)
	if err != nil {
		return Issued{}, err
	}
	var user nkeys.KeyPair
	pub := id.PublicKey
	if pub == "" {
		if user, err = nkeys.CreateUser(); err != nil {
			return Issued{}, err
		}
		pub = mustPublic(user)
	} else if !nkeys.IsValidPublicUserKey(pub) {
		return Issued{}, fmt.Errorf("public key %q: %w: want a user key (U...)", pub, ErrBadKey)
	}
	uc := jwt.NewUserClaims(pub)
	uc.Name = id.Name
	uc.IssuerAccount = s.AccountPublicKey()
	if id.Expires > 0 {
		uc.Expires = time.Now().Add(id.Expires).Unix()
	}
	switch {
	case perms != nil:
		uc.Permissions = perms.jwt()
		uc.AllowedConnectionTypes = conn
	case signer != issuerKey:
		// The role's scoped signing key supplies permissions and limits.
		uc.SetScoped(true)
	}
	token, err := uc.Encode(kp)
	if err != nil {
		return Issued{}, fmt.Errorf("user jwt %s-%s: %w", id.Role, id.Name, err)
	}
	base := filepath.Join(s.dir, usersDir, string(id.Role)+"-"+id.Name)
	out := Issued{PublicKey: pub, JWT: base + ".jwt", Env: base + ".env"}
	if err := writeFile(out.JWT, []byte(token+"\n"), 0o644); err != nil {
		return Issued{}, err
	}
	if user != nil {
		seed, _ := user.Seed()
		creds, err := jwt.FormatUserConfig(token, seed)
		if err != nil {
			return Issued{}, err
		}
		out.Creds = base + ".creds"
		if err := writeFile(out.Creds, creds, 0o600); err != nil {
			return Issued{}, err
		}
	}
	if id.Role == RoleLeaf {
		// A leaf node is a server, configured by leaf.conf, not by environment.
		out.Env = ""
		return out, nil
	}
	if err := writeFile(out.Env, []byte(EnvFile(id.Role, id.Name)), 0o644); err != nil {
		return Issued{}, err
	}
	return out, nil
}

// CredsDir is where the environment files say credentials are installed.
const CredsDir = "/etc/tessera"

// EnvFile is the environment an identity runs with (the systemd
// EnvironmentFile): its credentials, its inbox prefix and, for services
// and executors, no bootstrap (only admin changes streams).
func EnvFile(role Role, name string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s %s: install the .creds file as NATS_CREDS says.\n", role, name)
	fmt.Fprintf(&b, "NATS_CREDS=%s/%s-%s.creds\n", CredsDir, role, name)
	if p := InboxPrefix(role, name); p != "" {
		fmt.Fprintf(&b, "NATS_INBOX_PREFIX=%s\n", p)
	}
	if role != RoleAdmin && role != RoleCustomer {
		b.WriteString("NATS_BOOTSTRAP=false\n")
	}
	if role == RoleExecutor {
		fmt.Fprintf(&b, "TESSERA_EXECUTOR_NODE_ID=%s\n", name)
	}
	return b.String()
}

// Combine returns a .creds file made of a user JWT and its owner's seed
// file (an nkey seed or a .creds file): how a supplier turns the JWT the
// operator signed for its node key into credentials without sending the
// seed anywhere. It checks that the two belong together.
func Combine(userJWT, seedFile []byte) ([]byte, error) {
	uc, err := jwt.DecodeUserClaims(strings.TrimSpace(string(userJWT)))
	if err != nil {
		return nil, fmt.Errorf("user jwt: %w", err)
	}
	kp, err := nkeys.ParseDecoratedUserNKey(seedFile)
	if err != nil {
		return nil, fmt.Errorf("seed: %w: %w", ErrBadKey, err)
	}
	if pub := mustPublic(kp); pub != uc.Subject {
		return nil, fmt.Errorf("seed is for %s, the jwt for %s: %w", pub, uc.Subject, ErrBadKey)
	}
	seed, _ := kp.Seed()
	return jwt.FormatUserConfig(strings.TrimSpace(string(userJWT)), seed)
}

// Revoke revokes every JWT issued for the user key pub until now; the
// servers refuse it once they load the re-rendered server configuration.
func (s *Secrets) Revoke(pub string) error {
	if !nkeys.IsValidPublicUserKey(pub) {
		return fmt.Errorf("public key %q: %w: want a user key (U...)", pub, ErrBadKey)
	}
	ac, err := s.accountClaims()
	if err != nil {
		return err
	}
	ac.Revoke(pub)
	return s.signAccount(ac, s.name)
}

// ServerConfig renders the servers' accounts.conf: the operator, the system
// account and the account JWTs preloaded into a memory resolver. It holds
// no secret.
func (s *Secrets) ServerConfig() (string, error) {
	op, err := os.ReadFile(filepath.Join(s.dir, operatorJWT))
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrNotInitialised, err)
	}
	var b strings.Builder
	b.WriteString("# Generated by tessera-accounts server-config: the operator and account JWTs\n")
	b.WriteString("# (public, no secrets). Users are not listed: any user JWT signed by one of the\n")
	b.WriteString("# account's signing keys is accepted with the permissions it carries.\n")
	fmt.Fprintf(&b, "operator: %q\n", strings.TrimSpace(string(op)))
	fmt.Fprintf(&b, "system_account: %s\n", mustPublic(s.system))
	b.WriteString("resolver: MEMORY\nresolver_preload: {\n")
	for _, a := range []struct {
		kp   nkeys.KeyPair
		name string
	}{{s.system, systemName}, {s.account, s.name}} {
		token, err := os.ReadFile(s.accountPath(a.name, ".jwt"))
		if err != nil {
			return "", fmt.Errorf("%w: %w", ErrNotInitialised, err)
		}
		fmt.Fprintf(&b, "  # %s\n  %s: %q\n", a.name, mustPublic(a.kp), strings.TrimSpace(string(token)))
	}
	b.WriteString("}\n")
	return b.String(), nil
}

// accountClaims returns the grid account's current claims (keeping its
// revocations), or fresh ones.
func (s *Secrets) accountClaims() (*jwt.AccountClaims, error) {
	token, err := os.ReadFile(s.accountPath(s.name, ".jwt"))
	if errors.Is(err, fs.ErrNotExist) {
		return jwt.NewAccountClaims(s.AccountPublicKey()), nil
	}
	if err != nil {
		return nil, err
	}
	ac, err := jwt.DecodeAccountClaims(strings.TrimSpace(string(token)))
	if err != nil {
		return nil, fmt.Errorf("account jwt: %w", err)
	}
	return ac, nil
}

func (s *Secrets) signAccount(ac *jwt.AccountClaims, name string) error {
	vr := jwt.CreateValidationResults()
	ac.Validate(vr)
	if errs := vr.Errors(); len(errs) > 0 {
		return fmt.Errorf("account %s: %w", name, errors.Join(errs...))
	}
	token, err := ac.Encode(s.operator)
	if err != nil {
		return fmt.Errorf("account %s: %w", name, err)
	}
	return writeFile(s.accountPath(name, ".jwt"), []byte(token+"\n"), 0o644)
}

func (s *Secrets) signingKey(name string) (nkeys.KeyPair, error) {
	return load(s.signingPath(name), nkeys.PrefixByteAccount)
}

func (s *Secrets) accountPath(name, ext string) string {
	return filepath.Join(s.dir, accountsDir, name+ext)
}

func (s *Secrets) signingPath(name string) string {
	return filepath.Join(s.dir, signingDir, name+".nk")
}

func roleKeys() []string {
	var out []string
	for _, r := range Roles() {
		out = append(out, string(r))
	}
	return out
}

// jwt converts p to JWT permissions.
func (p Permissions) jwt() jwt.Permissions {
	out := jwt.Permissions{}
	out.Pub.Allow.Add(p.Publish...)
	out.Sub.Allow.Add(p.Subscribe...)
	if p.Responses > 0 {
		out.Resp = &jwt.ResponsePermission{MaxMsgs: 1, Expires: p.Responses}
	}
	return out
}

func loadOrCreate(path string, prefix nkeys.PrefixByte) (nkeys.KeyPair, error) {
	kp, err := load(path, prefix)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return kp, err
	}
	if kp, err = nkeys.CreatePair(prefix); err != nil {
		return nil, err
	}
	seed, _ := kp.Seed()
	if err := writeFile(path, append(seed, '\n'), 0o600); err != nil {
		return nil, err
	}
	return kp, nil
}

func load(path string, prefix nkeys.PrefixByte) (nkeys.KeyPair, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(b))))
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", path, ErrBadKey, err)
	}
	pub, _ := kp.PublicKey()
	if nkeys.Prefix(pub) != prefix {
		return nil, fmt.Errorf("%s: %w: not a %s key", path, ErrBadKey, prefix)
	}
	return kp, nil
}

func mustPublic(kp nkeys.KeyPair) string {
	pub, err := kp.PublicKey()
	if err != nil {
		panic(fmt.Sprintf("nkey without public key: %v", err))
	}
	return pub
}

func unlimited(v int64) int64 {
	if v <= 0 {
		return jwt.NoLimit
	}
	return v
}

// writeFile writes data to path through a temporary file, so that a crash
// never leaves half a key.
func writeFile(path string, data []byte, perm fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
