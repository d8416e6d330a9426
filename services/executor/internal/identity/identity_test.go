package identity

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// must returns v, failing the test when err is set: must(f())(t).
func must[T any](v T, err error) func(t *testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func newIdentity(t *testing.T) *Identity {
	t.Helper()
	id, err := New()
	if err != nil {
		t.Fatalf("new identity: %v", err)
	}
	if !strings.HasPrefix(id.PublicKey(), "U") || !nkeys.IsValidPublicUserKey(id.PublicKey()) {
		t.Fatalf("public key %q is not a user nkey", id.PublicKey())
	}
	return id
}

func TestSignVerify(t *testing.T) {
	id, other := newIdentity(t), newIdentity(t)
	data := []byte("usage of request r-1")
	sig, err := id.Sign(data)
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	accountPub := must(must(nkeys.CreateAccount())(t).PublicKey())(t)
	tests := []struct {
		name    string
		pub     string
		data    []byte
		sig     []byte
		wantErr error
	}{
		{name: "round trip", pub: id.PublicKey(), data: data, sig: sig},
		{name: "tampered data", pub: id.PublicKey(), data: []byte("usage of request r-2"), sig: sig, wantErr: ErrBadSignature},
		{name: "wrong key", pub: other.PublicKey(), data: data, sig: sig, wantErr: ErrBadSignature},
		{name: "truncated signature", pub: id.PublicKey(), data: data, sig: sig[:32], wantErr: ErrBadSignature},
		{name: "account key", pub: accountPub, data: data, sig: sig, wantErr: ErrBadPublicKey},
		{name: "garbage key", pub: "Unot-a-key", data: data, sig: sig, wantErr: ErrBadPublicKey},
		{name: "empty key", pub: "", data: data, sig: sig, wantErr: ErrBadPublicKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Verify(tt.pub, tt.data, tt.sig)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("verify: %v", err)
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("verify error = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

// heartbeat is a filled-in heartbeat as an executor sends it.
func heartbeat() *wire.Heartbeat {
	return &wire.Heartbeat{
		Node:       "n1",
		Supplier:   "acme",
		Region:     "eu-west",
		Seq:        42,
		Time:       time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.FixedZone("CET", 3600)),
		IntervalMS: 2000,
		State:      wire.NodeReady,
		Devices: []wire.Device{
			{Index: 0, Kind: "gpu", Name: "NVIDIA A100-SXM4-40GB", UUID: "GPU-1", MemoryTotal: 40 << 30, MemoryFree: 30 << 30, ComputeCapability: "8.0", Utilization: 12.5, TemperatureC: 41, PowerW: 88.25},
			{Index: 1, Kind: "gpu", Name: "NVIDIA A100-SXM4-40GB", UUID: "GPU-2", Error: "nvml memory info: GPU is lost <&>"},
		},
		MemoryBudget: 32 << 30,
		MemoryFree:   30 << 30,
		Fragments:    []string{"stories260k/layer.0"},
		Fetch:        wire.FetchProgress{BytesDone: 10, BytesTotal: 20},
		KVTokensFree: 4096,
		Speed:        []wire.SpeedSample{{Model: "stories260k", DType: "f32", Device: "GPU-1", DecodeTokS: 1e5 / 3}},
	}
}

func TestHeartbeatSignature(t *testing.T) {
	id, other := newIdentity(t), newIdentity(t)
	tests := []struct {
		name string
		// change alters the heartbeat after id signed it.
		change  func(hb *wire.Heartbeat)
		wantErr error
	}{
		{name: "untouched", change: func(*wire.Heartbeat) {}},
		{name: "sequence replayed", change: func(hb *wire.Heartbeat) { hb.Seq = 41 }, wantErr: ErrBadSignature},
		{name: "device memory inflated", change: func(hb *wire.Heartbeat) { hb.Devices[0].MemoryFree = 40 << 30 }, wantErr: ErrBadSignature},
		{name: "device error hidden", change: func(hb *wire.Heartbeat) { hb.Devices[1].Error = "" }, wantErr: ErrBadSignature},
		{name: "time moved", change: func(hb *wire.Heartbeat) { hb.Time = hb.Time.Add(time.Nanosecond) }, wantErr: ErrBadSignature},
		{name: "claims another key", change: func(hb *wire.Heartbeat) { hb.PublicKey = other.PublicKey() }, wantErr: ErrBadSignature},
		{name: "key is no user key", change: func(hb *wire.Heartbeat) { hb.PublicKey = "Nope" }, wantErr: ErrBadPublicKey},
		{name: "unsigned", change: func(hb *wire.Heartbeat) { hb.Signature = "" }, wantErr: ErrUnsigned},
		{name: "signature not base64", change: func(hb *wire.Heartbeat) { hb.Signature = "!!" }, wantErr: ErrBadSignature},
		{
			name: "signed by another node's key",
			change: func(hb *wire.Heartbeat) {
				data, err := CanonicalHeartbeat(hb)
				if err != nil {
					t.Fatal(err)
				}
				sig, err := other.Sign(data)
				if err != nil {
					t.Fatal(err)
				}
				hb.Signature = base64.StdEncoding.EncodeToString(sig)
			},
			wantErr: ErrBadSignature,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hb := heartbeat()
			if err := id.SignHeartbeat(hb); err != nil {
				t.Fatalf("sign: %v", err)
			}
			if hb.PublicKey != id.PublicKey() || hb.Signature == "" {
				t.Fatalf("signed heartbeat has key %q, signature %q", hb.PublicKey, hb.Signature)
			}
			tt.change(hb)
			// What the registry verifies is the decoded message.
			data, err := json.Marshal(hb)
			if err != nil {
				t.Fatal(err)
			}
			var got wire.Heartbeat
			if err := wire.Decode(data, &got); err != nil {
				t.Fatalf("decode: %v", err)
			}
			err = VerifyHeartbeat(&got)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("verify: %v", err)
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("verify error = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestSignHeartbeatRefusesAnotherKey(t *testing.T) {
	id, other := newIdentity(t), newIdentity(t)
	hb := heartbeat()
	hb.PublicKey = other.PublicKey()
	if err := id.SignHeartbeat(hb); !errors.Is(err, ErrKeyMismatch) {
		t.Fatalf("sign with another key named: %v, want ErrKeyMismatch", err)
	}
	if hb.Signature != "" {
		t.Errorf("heartbeat signed despite the mismatch")
	}
}

func TestCanonicalHeartbeatOmitsSignature(t *testing.T) {
	id := newIdentity(t)
	hb := heartbeat()
	before, err := CanonicalHeartbeat(hb)
	if err != nil {
		t.Fatal(err)
	}
	if err := id.SignHeartbeat(hb); err != nil {
		t.Fatal(err)
	}
	after, err := CanonicalHeartbeat(hb)
	if err != nil {
		t.Fatal(err)
	}
	// Signing filled in the key, so compare with that key set.
	withKey := heartbeat()
	withKey.PublicKey = id.PublicKey()
	want, err := json.Marshal(withKey)
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(want) {
		t.Errorf("canonical form of a signed heartbeat:\n got %s\nwant %s", after, want)
	}
	if strings.Contains(string(after), `"signature"`) || string(before) == string(after) {
		t.Errorf("canonical form must drop the signature and cover the key: %s", after)
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "executor")
	path := filepath.Join(dir, "node.seed")
	id, err := LoadOrCreate(path)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	for _, p := range []struct {
		path string
		mode fs.FileMode
	}{{path, 0o600}, {dir, 0o700 | fs.ModeDir}} {
		info, err := os.Stat(p.path)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode() != p.mode {
			t.Errorf("%s has mode %v, want %v", p.path, info.Mode(), p.mode)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "SU") {
		t.Errorf("seed file does not hold a user seed: %.2q...", data)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}

	again, err := LoadOrCreate(path)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	loaded, err := Load(path)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if again.PublicKey() != id.PublicKey() || loaded.PublicKey() != id.PublicKey() {
		t.Errorf("identity changed across loads: %s, %s, %s", id.PublicKey(), again.PublicKey(), loaded.PublicKey())
	}
	sig, err := loaded.Sign([]byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(id.PublicKey(), []byte("x"), sig); err != nil {
		t.Errorf("loaded identity signs differently: %v", err)
	}
}

func TestLoadOrCreateRace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "node.seed")
	keys := make([]string, 8)
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			id, err := LoadOrCreate(path)
			errs[i] = err
			if err == nil {
				keys[i] = id.PublicKey()
			}
		})
	}
	wg.Wait()
	for i := range keys {
		if errs[i] != nil {
			t.Fatalf("process %d: %v", i, errs[i])
		}
		if keys[i] != keys[0] {
			t.Errorf("process %d got identity %s, process 0 %s", i, keys[i], keys[0])
		}
	}
}

func TestLoadSeedFiles(t *testing.T) {
	user := must(nkeys.CreateUser())(t)
	seed := must(user.Seed())(t)
	userPub := must(user.PublicKey())(t)
	accountSeed := must(must(nkeys.CreateAccount())(t).Seed())(t)
	creds := "-----BEGIN NATS USER JWT-----\neyJhbGciOi.e30.sig\n------END NATS USER JWT------\n\n" +
		"-----BEGIN USER NKEY SEED-----\n" + string(seed) + "\n------END USER NKEY SEED------\n"
	tests := []struct {
		name    string
		content string
		wantPub string
		wantErr error
	}{
		{name: "seed with newline", content: string(seed) + "\n", wantPub: userPub},
		{name: "seed inside a creds file", content: creds, wantPub: userPub},
		{name: "account seed", content: string(accountSeed), wantErr: ErrBadSeed},
		{name: "garbage", content: "hello\n", wantErr: ErrBadSeed},
		{name: "empty", content: "", wantErr: ErrBadSeed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "node.seed")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			for _, load := range []func(string) (*Identity, error){Load, LoadOrCreate} {
				id, err := load(path)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), path) {
						t.Fatalf("load error = %v, want %v naming the file", err, tt.wantErr)
					}
					continue
				}
				if err != nil {
					t.Fatalf("load: %v", err)
				}
				if id.PublicKey() != tt.wantPub {
					t.Errorf("public key %s, want %s", id.PublicKey(), tt.wantPub)
				}
			}
			if got, _ := os.ReadFile(path); string(got) != tt.content {
				t.Errorf("seed file was rewritten")
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.seed")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("load of a missing file: %v, want fs.ErrNotExist", err)
	}
}
