package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/nats-io/nats.go/micro"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Nodes returns the live nodes that q selects, sorted by id, as the
// registry knows them now (KV nodes may lag by a few heartbeats).
func (r *Registry) Nodes(q wire.NodeQuery) []wire.NodeRecord {
	r.mu.Lock()
	out := make([]wire.NodeRecord, 0, len(r.nodes))
	for id, e := range r.nodes {
		if matches(id, &e.rec, q) {
			out = append(out, e.rec)
		}
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b wire.NodeRecord) int { return strings.Compare(a.Heartbeat.Node, b.Heartbeat.Node) })
	return out
}

// Node returns one live node's record.
func (r *Registry) Node(id string) (wire.NodeRecord, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.nodes[id]
	if e == nil {
		return wire.NodeRecord{}, fmt.Errorf("%w %q", ErrUnknownNode, id)
	}
	return e.rec, nil
}

func matches(id string, rec *wire.NodeRecord, q wire.NodeQuery) bool {
	if q.Node != "" && id != q.Node {
		return false
	}
	if q.Region != "" && rec.Heartbeat.Region != q.Region {
		return false
	}
	if q.State != "" && rec.State != q.State {
		return false
	}
	if q.Model != "" && !slices.Contains(rec.Heartbeat.Models, q.Model) &&
		!slices.ContainsFunc(rec.Heartbeat.Fragments, func(f string) bool { return strings.HasPrefix(f, q.Model+"/") }) {
		return false
	}
	return true
}

// startService registers the micro service "registry" with its endpoints
// nodes.list, nodes.get and stats under subjects.RegistryPrefix.
func (r *Registry) startService() (micro.Service, error) {
	svc, err := micro.AddService(r.bus.NC, micro.Config{
		Name:        "registry",
		Version:     "0.1.0",
		Description: "live inventory of the grid's nodes",
	})
	if err != nil {
		return nil, fmt.Errorf("registry service: %w", err)
	}
	add := func(name, subject string, h micro.HandlerFunc) error {
		return svc.AddEndpoint(name, h, micro.WithEndpointSubject(subject))
	}
	if err := errors.Join(
		add("nodes_list", subjects.RegistryNodesList, func(req micro.Request) {
			q, ok := r.decodeQuery(req)
			if ok {
				_ = req.RespondJSON(wire.NodeList{Nodes: r.Nodes(q)})
			}
		}),
		add("nodes_get", subjects.RegistryNodesGet, func(req micro.Request) {
			q, ok := r.decodeQuery(req)
			if !ok {
				return
			}
			rec, err := r.Node(q.Node)
			if err != nil {
				_ = req.Error("404", err.Error(), nil)
				return
			}
			_ = req.RespondJSON(rec)
		}),
		add("stats", subjects.RegistryStats, func(req micro.Request) { _ = req.RespondJSON(r.Stats()) }),
	); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("registry endpoints: %w", err)
	}
	return svc, nil
}

// decodeQuery reads a request's wire.NodeQuery (an empty body selects
// everything); a malformed one is answered with an error.
func (r *Registry) decodeQuery(req micro.Request) (wire.NodeQuery, bool) {
	var q wire.NodeQuery
	if len(req.Data()) == 0 {
		return q, true
	}
	if err := r.schema.Validate(wire.SchemaNodeQuery, req.Data()); err != nil {
		_ = req.Error("400", err.Error(), nil)
		return q, false
	}
	if err := wire.Decode(req.Data(), &q); err != nil {
		_ = req.Error("400", err.Error(), nil)
		return q, false
	}
	return q, true
}

// httpHandler serves the JSON view for the console: GET /nodes (query
// parameters model, region, state), GET /nodes/{id} and GET /stats.
func (r *Registry) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /nodes", func(w http.ResponseWriter, req *http.Request) {
		v := req.URL.Query()
		writeJSON(w, http.StatusOK, wire.NodeList{Nodes: r.Nodes(wire.NodeQuery{Model: v.Get("model"), Region: v.Get("region"), State: v.Get("state")})})
	})
	mux.HandleFunc("GET /nodes/{id}", func(w http.ResponseWriter, req *http.Request) {
		rec, err := r.Node(req.PathValue("id"))
		if err != nil {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, rec)
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, r.Stats())
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
