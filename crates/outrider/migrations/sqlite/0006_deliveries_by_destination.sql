-- A destination whose circuit opens has its pending deliveries deferred at once.
CREATE INDEX deliveries_by_destination ON deliveries (destination, status);
