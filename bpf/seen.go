package bpf

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
)

// seenWays is SEEN_WAYS in flowbus.c: the entries of one bucket of the
// tables that suppress retransmitted SYN-ACKs.
const seenWays = 4

// seenMin is the fewest entries the cold table can have: seen_occ holds
// eight buckets' counts per element.
const seenMin = seenWays * 8

// setSeen sizes the cold seen table for entries handshakes (entries/seenWays
// buckets, besides the hot table's fixed 1,024) and seeds the tables' hash
// with fresh random bits, so that no peer can know which of its handshakes
// share a bucket.
// hot, when not 0, shrinks the hot table to that many buckets (a power of
// two), for tests of the cold one.
func setSeen(spec *ebpf.CollectionSpec, entries, hot int) error {
	if entries < seenMin || entries > seenWays<<20 || entries&(entries-1) != 0 {
		return fmt.Errorf("seen table: %d entries: must be a power of two from %d to %d", entries, seenMin, seenWays<<20)
	}
	buckets := entries / seenWays
	spec.Maps[flowbusMapSeen].MaxEntries = uint32(buckets)
	spec.Maps[flowbusMapSeenOcc].MaxEntries = uint32(buckets / 8)
	if err := spec.Variables[flowbusVarSeenMask].Set(uint32(buckets - 1)); err != nil {
		return fmt.Errorf("setting seen_mask: %w", err)
	}
	if hot != 0 {
		if hot&(hot-1) != 0 || hot > int(spec.Maps[flowbusMapSeenHot].MaxEntries) {
			return fmt.Errorf("seen table: %d hot buckets: must be a power of two up to %d", hot, spec.Maps[flowbusMapSeenHot].MaxEntries)
		}
		spec.Maps[flowbusMapSeenHot].MaxEntries = uint32(hot)
		if err := spec.Variables[flowbusVarSeenHotMask].Set(uint32(hot - 1)); err != nil {
			return fmt.Errorf("setting seen_hot_mask: %w", err)
		}
	}
	var seed [8]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return fmt.Errorf("seeding the seen table: %w", err)
	}
	if err := spec.Variables[flowbusVarSeenSeed].Set(binary.LittleEndian.Uint64(seed[:])); err != nil {
		return fmt.Errorf("setting seen_seed: %w", err)
	}
	return nil
}

// setSlots sizes the slots array for n sockets (a power of two; 0: the
// default), for tests of the fallback to socket storage.
func setSlots(spec *ebpf.CollectionSpec, n int) error {
	if n == 0 {
		return nil
	}
	if n&(n-1) != 0 {
		return fmt.Errorf("slots: %d: must be a power of two", n)
	}
	spec.Maps[flowbusMapSlots].MaxEntries = uint32(n)
	if err := spec.Variables[flowbusVarSlotMask].Set(uint32(n - 1)); err != nil {
		return fmt.Errorf("setting slot_mask: %w", err)
	}
	return nil
}
