package outbox

import (
	"context"
	"errors"
)

// Store work off the owner loop (docs/scheduler.md, "The loop and the
// store"). Writes for parked resources (park, unpark, reschedule, dead-letter
// rows) and the reads that feed them run on one store goroutine at a time, in
// the order the loop queued them; the loop goes on meanwhile, and a resource
// with store work pending is held (not sent, not fed, its new events kept in
// memory behind it) until that work is done. So a slow or unavailable
// database stalls parked resources only: resources served from memory keep
// being delivered.

// storeOp is one piece of store work for the key it holds.
type storeOp struct {
	what string                       // the log message while it fails ("cannot park deliveries")
	key  *key                         // held until then has run
	f    func(context.Context) error  // on the store goroutine, retried until it succeeds or fails for good
	then func(context.Context, error) // on the loop, with f's final error
	err  error
}

// enqueue queues op behind the store work already queued, and holds its key.
func (s *scheduler) enqueue(ctx context.Context, op *storeOp) {
	op.key.writes++
	s.ops = append(s.ops, op)
	if len(s.ops) == 1 {
		s.runOp(ctx, op)
	}
}

func (s *scheduler) runOp(ctx context.Context, op *storeOp) {
	s.sends.Add(1)
	go func() {
		defer s.sends.Done()
		op.err = s.write(ctx, op.what, func() error { return op.f(ctx) })
		select {
		case s.stored <- op:
		case <-ctx.Done(): // run has returned or is returning: nobody applies it
		}
	}()
}

// handleStored applies finished store work on the loop, starts the next, and
// lets the key go on once nothing is pending for it.
func (s *scheduler) handleStored(ctx context.Context, op *storeOp) {
	s.ops[0] = nil
	s.ops = s.ops[1:]
	if len(s.ops) > 0 {
		s.runOp(ctx, s.ops[0])
	}
	k := op.key
	k.writes--
	op.then(ctx, op.err)
	if op.err != nil && !errors.Is(op.err, ErrPermanent) && !errors.Is(op.err, ErrFeedLater) {
		return // the epoch ended: the key stays held, nothing more is written
	}
	if k.writes > 0 || s.gone || s.keys[k.id] != k {
		return
	}
	if k.parked {
		s.flushParked(ctx, k) // what came for it meanwhile follows it into the table
	}
	s.schedule(k, s.now())
}

// settle waits for the queued store work and applies it, for a change of the
// whole subscription (disable) that must see every key in its place. False:
// ctx ended first.
func (s *scheduler) settle(ctx context.Context) bool {
	for len(s.ops) > 0 {
		select {
		case op := <-s.stored:
			s.handleStored(ctx, op)
		case <-ctx.Done():
			return false
		}
	}
	return true
}
