package accounts

import (
	"strings"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

// shape is a subject's token count and wildcard tokens.
func shape(s string) (tokens, stars, tails int) {
	for _, t := range strings.Split(s, ".") {
		tokens++
		switch t {
		case "*":
			stars++
		case ">":
			tails++
		}
	}
	return
}

// FuzzFor: whatever name and domain an operator types, the permissions
// issued are refused or have exactly the template's shape: a name fills
// one token and never adds a wildcard or a token.
func FuzzFor(f *testing.F) {
	f.Add(uint8(0), "n1", "")
	f.Add(uint8(4), "node-7_a", "tessera")
	f.Add(uint8(5), "acme", "*")
	f.Add(uint8(4), "a.>", "")
	f.Add(uint8(4), "*", "x.y")
	f.Fuzz(func(t *testing.T, r uint8, name, domain string) {
		role := Roles()[int(r)%len(Roles())]
		js := JetStream{Domain: domain}
		p, err := For(role, name, js)
		if err != nil {
			return
		}
		tmpl, err := Template(role, js)
		if err != nil {
			t.Fatalf("For accepted domain %q, Template refuses it: %v", domain, err)
		}
		for _, pair := range [][2][]string{{p.Publish, tmpl.Publish}, {p.Subscribe, tmpl.Subscribe}} {
			got, want := pair[0], pair[1]
			if len(got) != len(want) {
				t.Fatalf("%d subjects, template has %d", len(got), len(want))
			}
			for i := range got {
				if !server.IsValidSubject(got[i]) {
					t.Fatalf("name %q domain %q: invalid subject %q", name, domain, got[i])
				}
				a, b, c := shape(got[i])
				x, y, z := shape(strings.ReplaceAll(want[i], NameVar, "x"))
				if a != x || b != y || c != z {
					t.Fatalf("name %q domain %q: %q does not have the shape of %q", name, domain, got[i], want[i])
				}
			}
		}
	})
}

// FuzzCombine: a JWT and a seed file from a supplier combine into
// credentials that hold exactly that JWT and seed, or are refused.
func FuzzCombine(f *testing.F) {
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	acc, _ := nkeys.CreateAccount()
	token, _ := jwt.NewUserClaims(pub).Encode(acc)
	creds, _ := jwt.FormatUserConfig(token, seed)
	f.Add([]byte(token), seed)
	f.Add([]byte(token), creds)
	f.Add(creds, []byte("SUAxxxx"))
	f.Add([]byte("eyJ0eXAiOiJKV1QifQ.e30.x"), seed)
	f.Fuzz(func(t *testing.T, userJWT, seedFile []byte) {
		out, err := Combine(userJWT, seedFile)
		if err != nil {
			return
		}
		tok, err := jwt.ParseDecoratedJWT(out)
		if err != nil {
			t.Fatalf("combined creds hold no jwt: %v", err)
		}
		uc, err := jwt.DecodeUserClaims(tok)
		if err != nil {
			t.Fatal(err)
		}
		ukp, err := nkeys.ParseDecoratedUserNKey(out)
		if err != nil {
			t.Fatalf("combined creds hold no seed: %v", err)
		}
		if p, _ := ukp.PublicKey(); p != uc.Subject {
			t.Fatalf("seed of %s with the jwt of %s", p, uc.Subject)
		}
		if tok != strings.TrimSpace(string(userJWT)) {
			t.Fatal("combined creds hold another jwt")
		}
	})
}
