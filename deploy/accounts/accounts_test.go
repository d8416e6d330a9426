package accounts

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

func TestForRefusesNamesThatWidenPermissions(t *testing.T) {
	for _, name := range []string{"", "*", ">", "n1.>", "a.b", "n 1", "{{name()}}", strings.Repeat("x", 129)} {
		if _, err := For(RoleExecutor, name, JetStream{}); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
}

func TestForNamesOnlyItself(t *testing.T) {
	for _, role := range Roles() {
		for _, js := range []JetStream{{}, {Domain: "tessera"}} {
			p, err := For(role, "n1", js)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range slices.Concat(p.Publish, p.Subscribe) {
				if !server.IsValidSubject(s) {
					t.Errorf("%s: invalid subject %q", role, s)
				}
				if strings.Contains(s, "{{") {
					t.Errorf("%s: unexpanded %q", role, s)
				}
			}
		}
	}
	p, _ := For(RoleExecutor, "n1", JetStream{})
	for _, want := range []string{subjects.Heartbeat("n1"), subjects.UsageNode("n1")} {
		if !slices.Contains(p.Publish, want) {
			t.Errorf("executor n1 may not publish %s", want)
		}
	}
	for _, s := range slices.Concat(p.Publish, p.Subscribe) {
		if strings.HasPrefix(s, subjects.Root+".node.") && !strings.HasPrefix(s, subjects.Root+".node.n1.") {
			t.Errorf("executor n1 reaches another node: %s", s)
		}
		if strings.HasPrefix(s, subjects.Root+".usage.customer") {
			t.Errorf("executor n1 reaches customers' usage: %s", s)
		}
	}
	if _, err := Template(RoleAdmin, JetStream{}); !errors.Is(err, ErrUnrestricted) {
		t.Errorf("admin template: %v", err)
	}
	if _, err := Template("pirate", JetStream{}); !errors.Is(err, ErrUnknownRole) {
		t.Errorf("unknown role: %v", err)
	}
}

func TestDomainPermissionsUseTheDomainAPI(t *testing.T) {
	p, err := For(RoleExecutor, "n1", JetStream{Domain: "tessera"})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range p.Publish {
		if strings.HasPrefix(s, "$JS.API.") {
			t.Errorf("%s: the local JetStream API, not the grid's domain", s)
		}
	}
	if !slices.Contains(p.Publish, "$JS.tessera.API.STREAM.INFO.KV_"+subjects.BucketPlans) {
		t.Errorf("no domain API subjects in %q", p.Publish)
	}
}

func TestInitIssueAndServerConfig(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	if _, err := Open(dir); !errors.Is(err, ErrNotInitialised) {
		t.Fatalf("open before init: %v", err)
	}
	s, err := Init(dir, InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	account := s.AccountPublicKey()
	// Init again keeps every key.
	if s, err = Init(dir, InitOptions{}); err != nil || s.AccountPublicKey() != account {
		t.Fatalf("second init: %v, account %s then %s", err, account, s.AccountPublicKey())
	}
	out, err := s.Issue(Identity{Role: RoleExecutor, Name: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := os.ReadFile(out.Creds)
	if err != nil {
		t.Fatal(err)
	}
	token, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(token)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Name != "n1" || uc.IssuerAccount != account || !uc.HasEmptyPermissions() {
		t.Fatalf("user claims %+v", uc)
	}
	// Seeds are for their owner only.
	for _, f := range []string{out.Creds, filepath.Join(dir, operatorSeed), filepath.Join(dir, signingDir, "executor.nk")} {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v", f, fi.Mode(), err)
		}
	}
	env, err := os.ReadFile(out.Env)
	if err != nil || !bytes.Contains(env, []byte("NATS_INBOX_PREFIX="+subjects.NodeInbox("n1")+"\n")) || !bytes.Contains(env, []byte("NATS_BOOTSTRAP=false\n")) {
		t.Fatalf("env file %s: %v", env, err)
	}
	// The account carries the executor's template as a scoped signing key.
	ac, err := s.accountClaims()
	if err != nil {
		t.Fatal(err)
	}
	scope, ok := ac.SigningKeys.GetScope(uc.Issuer)
	if !ok || scope == nil {
		t.Fatalf("user signed by %s, not a scoped key of the account", uc.Issuer)
	}
	if us := scope.(*jwt.UserScope); us.Role != string(RoleExecutor) || !slices.Contains(us.Template.Pub.Allow, subjects.Heartbeat(NameVar)) {
		t.Fatalf("scope %+v", us)
	}
	conf, err := s.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"operator:", "system_account:", "resolver: MEMORY", account} {
		if !strings.Contains(conf, want) {
			t.Errorf("accounts.conf lacks %q", want)
		}
	}
	if seed := regexp.MustCompile(`S[UAO][A-Z2-7]{56}`).FindString(conf); seed != "" {
		t.Errorf("accounts.conf holds a seed")
	}
	if _, err := s.Issue(Identity{Role: "pirate", Name: "x"}); !errors.Is(err, ErrUnknownRole) {
		t.Errorf("unknown role: %v", err)
	}
	if _, err := s.Issue(Identity{Role: RoleExecutor, Name: "n2", PublicKey: "SUAAAA"}); !errors.Is(err, ErrBadKey) {
		t.Errorf("seed as public key: %v", err)
	}
}

// TestOwnKeyAndCombine: a supplier makes its node key (keygen) and keeps the
// seed; the operator signs its public key; the supplier combines both into
// .creds.
func TestOwnKeyAndCombine(t *testing.T) {
	dir := t.TempDir()
	s, err := Init(filepath.Join(dir, "secrets"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var printed bytes.Buffer
	seedFile := filepath.Join(dir, "node.seed")
	if err := Command(context.Background(), []string{"keygen", "-o", seedFile}, &printed); err != nil {
		t.Fatal(err)
	}
	if err := Command(context.Background(), []string{"keygen", "-o", seedFile}, &printed); err == nil {
		t.Fatal("keygen replaced an existing key")
	}
	seed, err := os.ReadFile(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := nkeys.ParseDecoratedUserNKey(seed)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	if strings.TrimSpace(printed.String()) != pub {
		t.Fatalf("keygen printed %q for key %s", printed.String(), pub)
	}
	out, err := s.Issue(Identity{Role: RoleExecutor, Name: "n7", PublicKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	if out.Creds != "" {
		t.Fatalf("creds written for a key the operator does not hold: %s", out.Creds)
	}
	token, err := os.ReadFile(out.JWT)
	if err != nil {
		t.Fatal(err)
	}
	creds, err := Combine(token, seed)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := nkeys.ParseDecoratedUserNKey(creds); err != nil || mustPublic(got) != pub {
		t.Fatalf("combined creds: %v", err)
	}
	other, _ := nkeys.CreateUser()
	otherSeed, _ := other.Seed()
	if _, err := Combine(token, otherSeed); !errors.Is(err, ErrBadKey) {
		t.Fatalf("someone else's seed: %v", err)
	}
}

func TestCommandPermissionsAndErrors(t *testing.T) {
	var out bytes.Buffer
	if err := Command(context.Background(), []string{"permissions", "-role", "customer", "-name", "acme"}, &out); err != nil {
		t.Fatal(err)
	}
	var p Permissions
	if err := json.Unmarshal(out.Bytes(), &p); err != nil || !slices.Contains(p.Subscribe, subjects.CustomerInbox("acme")+".>") {
		t.Fatalf("permissions %s: %v", out.Bytes(), err)
	}
	for _, args := range [][]string{nil, {"frobnicate"}, {"issue", "-role", "executor"}, {"permissions", "-role", "admin"}, {"init", "extra"}} {
		if err := Command(context.Background(), append([]string{"-dir", t.TempDir()}, args...), &out); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}
