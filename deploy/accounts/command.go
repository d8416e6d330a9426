package accounts

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
)

// Usage is the tessera-accounts command's help.
const Usage = `tessera-accounts: credentials and server configuration for a secured Tessera grid

usage: tessera-accounts [-dir SECRETS] COMMAND [flags]

  init            create the operator, the system and grid accounts and one
                  scoped signing key per role (keeps existing keys)
                    -operator NAME  -account NAME  -disk BYTES  -memory BYTES
  issue           issue a user: writes users/ROLE-NAME.{jwt,creds,env}
                    -role registry|planner|router|settlement|executor|customer|admin
                    -name NAME (node id, customer id or instance label)
                    -pubkey U...  (the user's own key: only a JWT is written)
                    -expires DURATION
  leaf            issue a supplier site's leaf node credentials
                    -supplier ID  -nodes ID,ID,...  -domain tessera  -expires DURATION
  server-config   print accounts.conf for the servers (-o FILE to write it)
  revoke          revoke a user key: -pubkey U... (then server-config and reload)
  keygen          make a node key on the machine that will use it: writes
                    the seed to -o FILE (owner-only), prints the public key
                    for the operator's "issue -pubkey"
  combine         make a .creds file from a JWT and your own seed
                    -jwt FILE  -seed FILE  -o FILE
  permissions     print a role's permissions as JSON: -role ROLE [-name NAME] [-domain D]
  bootstrap       create or update every stream, bucket and the object store
                  with the admin credentials in NATS_CREDS (NATS_REPLICAS replicas)

SECRETS defaults to $TESSERA_SECRETS_DIR or ./secrets; never commit it.
`

// Command runs the tessera-accounts command line (args without the
// program name), writing results to stdout.
func Command(ctx context.Context, args []string, stdout io.Writer) error {
	top := flag.NewFlagSet("tessera-accounts", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	dir := top.String("dir", envOr("TESSERA_SECRETS_DIR", "secrets"), "secrets directory")
	if err := top.Parse(args); err != nil {
		return fmt.Errorf("%w\n\n%s", err, Usage)
	}
	if top.NArg() == 0 {
		return fmt.Errorf("no command\n\n%s", Usage)
	}
	cmd, rest := top.Arg(0), top.Args()[1:]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	parse := func() error {
		if err := fs.Parse(rest); err != nil {
			return fmt.Errorf("%s: %w", cmd, err)
		}
		if fs.NArg() > 0 {
			return fmt.Errorf("%s: unexpected arguments %q", cmd, fs.Args())
		}
		return nil
	}
	switch cmd {
	case "init":
		var o InitOptions
		fs.StringVar(&o.Operator, "operator", "tessera", "operator name")
		fs.StringVar(&o.Account, "account", "TESSERA", "grid account name")
		fs.Int64Var(&o.DiskStorage, "disk", 0, "JetStream disk bytes (0: unlimited)")
		fs.Int64Var(&o.MemoryStorage, "memory", 0, "JetStream memory bytes (0: unlimited)")
		if err := parse(); err != nil {
			return err
		}
		s, err := Init(*dir, o)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "initialised %s (account %s %s)\n", s.Dir(), o.Account, s.AccountPublicKey())
		return nil
	case "issue":
		var id Identity
		role := fs.String("role", "", "role")
		fs.StringVar(&id.Name, "name", "", "node id, customer id or instance label")
		fs.StringVar(&id.PublicKey, "pubkey", "", "the user's own public nkey")
		fs.DurationVar(&id.Expires, "expires", 0, "lifetime (0: none)")
		if err := parse(); err != nil {
			return err
		}
		id.Role = Role(*role)
		s, err := Open(*dir)
		if err != nil {
			return err
		}
		out, err := s.Issue(id)
		if err != nil {
			return err
		}
		return printIssued(stdout, out)
	case "leaf":
		supplier := fs.String("supplier", "", "supplier id")
		nodes := fs.String("nodes", "", "comma-separated node ids of the site")
		domain := fs.String("domain", "tessera", "the grid's JetStream domain")
		expires := fs.Duration("expires", 0, "lifetime (0: none)")
		if err := parse(); err != nil {
			return err
		}
		s, err := Open(*dir)
		if err != nil {
			return err
		}
		out, err := s.IssueLeaf(*supplier, splitList(*nodes), *domain, *expires)
		if err != nil {
			return err
		}
		return printIssued(stdout, out)
	case "server-config":
		outFile := fs.String("o", "", "write to this file instead of stdout")
		if err := parse(); err != nil {
			return err
		}
		s, err := Open(*dir)
		if err != nil {
			return err
		}
		conf, err := s.ServerConfig()
		if err != nil {
			return err
		}
		if *outFile == "" {
			_, err = io.WriteString(stdout, conf)
			return err
		}
		if err := os.MkdirAll(filepath.Dir(*outFile), 0o755); err != nil {
			return err
		}
		return writeFile(*outFile, []byte(conf), 0o644)
	case "revoke":
		pub := fs.String("pubkey", "", "user public key")
		if err := parse(); err != nil {
			return err
		}
		s, err := Open(*dir)
		if err != nil {
			return err
		}
		if err := s.Revoke(*pub); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "revoked %s: render server-config again and reload the servers\n", *pub)
		return nil
	case "keygen":
		outFile := fs.String("o", "", "the seed file to write")
		if err := parse(); err != nil {
			return err
		}
		if *outFile == "" {
			return errors.New("keygen: -o is required")
		}
		if _, err := os.Stat(*outFile); err == nil {
			return fmt.Errorf("keygen: %s exists; a node keeps its key", *outFile)
		}
		kp, err := nkeys.CreateUser()
		if err != nil {
			return err
		}
		seed, _ := kp.Seed()
		if err := writeFile(*outFile, append(seed, '\n'), 0o600); err != nil {
			return err
		}
		fmt.Fprintln(stdout, mustPublic(kp))
		return nil
	case "combine":
		jwtFile := fs.String("jwt", "", "user JWT file")
		seedFile := fs.String("seed", "", "your nkey seed (or .creds) file")
		outFile := fs.String("o", "", "the .creds file to write")
		if err := parse(); err != nil {
			return err
		}
		if *jwtFile == "" || *seedFile == "" || *outFile == "" {
			return errors.New("combine: -jwt, -seed and -o are required")
		}
		j, err := os.ReadFile(*jwtFile)
		if err != nil {
			return err
		}
		seed, err := os.ReadFile(*seedFile)
		if err != nil {
			return err
		}
		creds, err := Combine(j, seed)
		if err != nil {
			return err
		}
		return writeFile(*outFile, creds, 0o600)
	case "permissions":
		role := fs.String("role", "", "role")
		name := fs.String("name", "", "identity name (empty: the template)")
		domain := fs.String("domain", "", "JetStream domain (clients behind a leaf node)")
		if err := parse(); err != nil {
			return err
		}
		var p Permissions
		var err error
		if *name == "" {
			p, err = Template(Role(*role), JetStream{Domain: *domain})
		} else {
			p, err = For(Role(*role), *name, JetStream{Domain: *domain})
		}
		if err != nil {
			return err
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		out := struct {
			Publish   []string `json:"publish"`
			Subscribe []string `json:"subscribe"`
			Responses string   `json:"responses,omitempty"`
		}{Publish: p.Publish, Subscribe: p.Subscribe}
		if p.Responses > 0 {
			out.Responses = p.Responses.String()
		}
		return enc.Encode(out)
	case "bootstrap":
		if err := parse(); err != nil {
			return err
		}
		return bootstrap(ctx, stdout)
	}
	return fmt.Errorf("unknown command %q\n\n%s", cmd, Usage)
}

// bootstrap creates the grid's streams, buckets and object store with the
// identity configured by the NATS_* environment (the admin's).
func bootstrap(ctx context.Context, stdout io.Writer) error {
	var nc config.NATS
	if err := config.Load(ctx, "", &nc); err != nil {
		return err
	}
	if nc.URL == "" {
		return errors.New("bootstrap: NATS_URL is not set")
	}
	c, err := bus.Connect(ctx, nc, nil, "tessera-accounts-bootstrap")
	if err != nil {
		return err
	}
	defer c.Close()
	bctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := bus.Bootstrap(bctx, c.JS, nc.Replicas); err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	fmt.Fprintf(stdout, "bootstrapped %s with %d replicas\n", c.NC.ConnectedUrlRedacted(), max(nc.Replicas, 1))
	return nil
}

func printIssued(w io.Writer, out Issued) error {
	fmt.Fprintf(w, "user %s\n  jwt   %s\n", out.PublicKey, out.JWT)
	if out.Creds != "" {
		fmt.Fprintf(w, "  creds %s\n", out.Creds)
	}
	if out.Env != "" {
		fmt.Fprintf(w, "  env   %s\n", out.Env)
	}
	return nil
}

// splitList splits a comma- or space-separated list.
func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || unicode.IsSpace(r) })
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
