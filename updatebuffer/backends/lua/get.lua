-- Read one row atomically: its in-flight part (claimed, not yet acknowledged) and its pending
-- part. KEYS[1] <base>:~f:<member>, KEYS[2] <base>:<member>. Returns both HGETALL replies.
return { redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]) }
