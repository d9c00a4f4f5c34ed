package mtasts

// The policy in force for a domain: the TXT record, the cluster-wide cache
// in NATS KV, and when to fetch (RFC 8461 §5.1).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/net/idna"
	"golang.org/x/sync/singleflight"
)

// Bucket is the KV bucket of fetched policies, one key per policy domain.
const Bucket = "JETMAIL_MTASTS"

const (
	// memoTTL is how long a deliverer trusts its own copy of the bucket's
	// entry for a domain before reading the bucket again: another
	// deliverer may have fetched a newer policy.
	memoTTL = 30 * time.Second
	// memoMax bounds the copies kept; past it, arbitrary ones are dropped.
	memoMax = 10000
	// failBackoff is how long a deliverer waits to fetch a domain's policy
	// again after a fetch failed. Meanwhile a cached policy keeps applying.
	failBackoff = 5 * time.Minute
	// maxRefresh is the longest a policy is used without fetching it again
	// to see whether it changed under the same record id; a policy with a
	// shorter max_age is fetched again at half of it, so a policy host that
	// is briefly down does not let the policy lapse.
	maxRefresh = 24 * time.Hour
	// minAge is the shortest a fetched policy is used, whatever its
	// max_age says: a policy of max_age 0 would otherwise cost a fetch per
	// delivery.
	minAge = time.Minute
)

// OpenBucket opens the bucket of policies, creating it if missing. Entries
// live a year and a day after their last write: longer than any max_age.
func OpenBucket(ctx context.Context, js jetstream.JetStream, replicas int, storage jetstream.StorageType) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      Bucket,
			Description: "jetmail: MTA-STS policies fetched by the deliverers (RFC 8461)",
			History:     1,
			TTL:         MaxMaxAge + 24*time.Hour,
			Storage:     storage,
			Replicas:    replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("mtasts: bucket %s: %w", Bucket, err)
	}
	return kv, nil
}

// Policies says which policy is in force for a domain. Its fields must be
// set before the first Lookup; it is then safe for concurrent use.
type Policies struct {
	// TXT looks up the TXT records at label under domain
	// (resolve.Resolver.TXT).
	TXT func(ctx context.Context, label, domain string) ([]string, error)
	// Fetcher fetches policies.
	Fetcher *Fetcher
	// KV is the cluster-wide cache (OpenBucket); nil: each process keeps
	// what it fetched to itself.
	KV jetstream.KeyValue
	// Fetched, when set, is told of every fetch: err nil, or a
	// *FetchError.
	Fetched func(domain string, err error)
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	group singleflight.Group
	mu    sync.Mutex
	memo  map[string]*memo
}

// memo is a deliverer's copy of the bucket's entry for a domain.
type memo struct {
	pol         *Policy // nil: the bucket has none
	read        time.Time
	failedUntil time.Time
}

// Lookup returns the policy in force for domain (lower case A-labels), or
// nil when none is. A policy in mode none is returned: it is in force and
// says to do nothing. The error, when not nil, is what went wrong on the
// way (a failed fetch, a *FetchError; an unreadable bucket) and is worth a
// report; the policy returned beside it is still the one to apply.
//
// As RFC 8461 §5.1 says: a record whose id differs from the cached
// policy's means a new policy, fetched now; without a record (deleted, or
// the DNS failed), a cached policy applies until it expires; a failed
// fetch leaves the cached policy in force. An expired policy is fetched
// again if the record is still there, and is otherwise gone.
func (p *Policies) Lookup(ctx context.Context, domain string) (*Policy, error) {
	domain, ok := policyDomain(domain)
	if !ok {
		return nil, nil // an address literal, or not a domain: no policy
	}
	now := p.now()
	id := ""
	if txts, err := p.TXT(ctx, "_mta-sts", domain); err == nil {
		id, _ = ParseRecord(txts)
	}
	cached, readErr := p.cached(ctx, domain, now)
	valid := cached != nil && now.Before(cached.Fetched.Add(max(cached.MaxAge, minAge)))
	if id == "" {
		if valid {
			return cached, readErr
		}
		return nil, readErr
	}
	if valid && cached.ID == id && now.Before(cached.Fetched.Add(refreshAfter(cached))) {
		return cached, readErr
	}
	fresh, err := p.fetch(ctx, domain, id, now)
	if err != nil {
		if valid {
			return cached, err
		}
		return nil, err
	}
	return fresh, nil
}

// policyDomain is domain in the form policies are looked up and cached
// under: lower case A-labels without the trailing dot.
func policyDomain(domain string) (string, bool) {
	d, err := idna.Lookup.ToASCII(strings.ToLower(strings.TrimSuffix(domain, ".")))
	if err != nil || d == "" || strings.HasPrefix(d, "[") || !validPattern(d) || strings.HasPrefix(d, "*.") {
		return "", false
	}
	return d, true
}

func refreshAfter(pol *Policy) time.Duration { return max(min(pol.MaxAge/2, maxRefresh), minAge) }

// cached is the bucket's policy for domain, through this deliverer's copy
// of it. When the bucket cannot be read, the copy serves, however old.
func (p *Policies) cached(ctx context.Context, domain string, now time.Time) (*Policy, error) {
	m := p.memoOf(domain)
	if m != nil && (now.Sub(m.read) < memoTTL || p.KV == nil) {
		return m.pol, nil
	}
	if p.KV == nil {
		return nil, nil
	}
	var pol *Policy
	e, err := p.KV.Get(ctx, domain)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		if m != nil {
			return m.pol, fmt.Errorf("mtasts: reading the cached policy of %s: %w", domain, err)
		}
		return nil, fmt.Errorf("mtasts: reading the cached policy of %s: %w", domain, err)
	default:
		pol = &Policy{}
		if err := json.Unmarshal(e.Value(), pol); err != nil {
			pol = nil
		}
	}
	p.remember(domain, func(m *memo) { m.pol, m.read = pol, now })
	return pol, nil
}

// fetch fetches domain's policy announced under id and stores it in the
// bucket; concurrent callers for one domain share one fetch, and a failed
// fetch is not tried again for failBackoff.
func (p *Policies) fetch(ctx context.Context, domain, id string, now time.Time) (*Policy, error) {
	v, err, _ := p.group.Do(domain, func() (any, error) {
		// A fetch for the same id that finished between this caller's
		// look at the cache and here has done the work already; one that
		// failed is not tried again yet.
		if m := p.memoOf(domain); m != nil {
			if m.pol != nil && m.pol.ID == id && now.Before(m.pol.Fetched.Add(refreshAfter(m.pol))) {
				return m.pol, nil
			}
			if now.Before(m.failedUntil) {
				return nil, &FetchError{Domain: domain, Result: ResultFetchError, Err: fmt.Errorf("the last fetch failed; next try after %s", m.failedUntil.Format(time.RFC3339))}
			}
		}
		// Shared by every caller waiting for it: not cut short when the
		// first one's context ends (Fetch has its own deadline).
		ctx := context.WithoutCancel(ctx)
		pol, err := p.Fetcher.Fetch(ctx, domain)
		if p.Fetched != nil {
			p.Fetched(domain, err)
		}
		if err != nil {
			p.remember(domain, func(m *memo) { m.failedUntil = now.Add(failBackoff) })
			return nil, err
		}
		pol.ID, pol.Fetched = id, now
		if b, err := json.Marshal(pol); err == nil && p.KV != nil {
			// A policy that cannot be shared still applies here.
			_, _ = p.KV.Put(ctx, domain, b)
		}
		p.remember(domain, func(m *memo) { m.pol, m.read, m.failedUntil = pol, now, time.Time{} })
		return pol, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*Policy), nil
}

// memoOf is a copy of this deliverer's entry for domain, or nil.
func (p *Policies) memoOf(domain string) *memo {
	p.mu.Lock()
	defer p.mu.Unlock()
	m, ok := p.memo[domain]
	if !ok {
		return nil
	}
	c := *m
	return &c
}

func (p *Policies) remember(domain string, f func(*memo)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.memo == nil {
		p.memo = make(map[string]*memo)
	}
	m := p.memo[domain]
	if m == nil {
		if len(p.memo) >= memoMax {
			for k := range p.memo {
				delete(p.memo, k)
				if len(p.memo) < memoMax*3/4 {
					break
				}
			}
		}
		m = &memo{}
		p.memo[domain] = m
	}
	f(m)
}

func (p *Policies) now() time.Time {
	if p.Now != nil {
		return p.Now()
	}
	return time.Now()
}
